"""`make images` and `make kind-up` (scripts/images.sh, scripts/kind-up.sh).

The CI machine has neither a running Docker nor kind, so the kind-up tests put stand-ins for `docker`,
`podman` and `kind` first on PATH: small scripts that record how they were called. What is checked is
what the scripts ask of those tools (which directory is built, under which name, loaded into which
cluster), against what the chart deploys by default. `make images` without any engine runs for real.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from slm_devtools import tools
from tests.chart.chartlib import by_kind, documents, render

REPO = tools.REPO_ROOT
# What the scripts need from the system, and nothing else (no docker, podman or kind of the host).
SYSTEM_TOOLS = ("bash", "sh", "env", "sed", "grep", "dirname", "mktemp", "rm", "cat", "make", "head")


def bare_path(directory: Path) -> Path:
    """A PATH directory holding only SYSTEM_TOOLS, linked from the host."""
    directory.mkdir()
    for name in SYSTEM_TOOLS:
        found = shutil.which(name)
        assert found, f"{name} is not installed"
        (directory / name).symlink_to(found)
    return directory


def stand_in(directory: Path, name: str, log: Path, script: str = "") -> None:
    """A `name` that appends its arguments (and KIND_EXPERIMENTAL_PROVIDER) to `log`, then runs `script`."""
    path = directory / name
    path.write_text(f'#!/bin/sh\nprintf "%s provider=%s" "{name}" "${{KIND_EXPERIMENTAL_PROVIDER:-}}" >>"{log}"\n'
                    f'for a in "$@"; do printf " %s" "$a" >>"{log}"; done\necho >>"{log}"\n{script}\n')
    path.chmod(0o755)


def engine(directory: Path, name: str, log: Path) -> None:
    # `save --output FILE IMAGE` writes FILE, as the real ones do.
    stand_in(directory, name, log,
             'if [ "$1" = save ]; then while [ $# -gt 0 ]; do [ "$1" = --output ] && : >"$2"; shift; done; fi')


def calls(log: Path) -> list[list[str]]:
    return [shlex.split(line) for line in log.read_text().splitlines()]


def chart_default_images() -> dict[str, str]:
    """The operator image and the default server image the chart deploys with its default values, each
    with the directory it is built from."""
    (deployment,) = by_kind(documents(render()), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return {container["image"]: "operator", env["SLM_OPERATOR_SERVER_IMAGE"]: "server"}


def run(command: list[str], path: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": str(path), "HOME": str(home)})


def test_make_images_without_docker_or_podman_says_what_is_missing(tmp_path: Path) -> None:
    result = run(["make", "images"], bare_path(tmp_path / "bin"), tmp_path)
    assert result.returncode != 0
    assert "neither 'docker' nor 'podman' is on PATH" in result.stderr, result.stderr


@pytest.mark.parametrize("available", ["docker", "podman"])
def test_kind_up_builds_both_images_as_the_chart_names_them_and_loads_them(tmp_path: Path, available: str) -> None:
    path, log = bare_path(tmp_path / "bin"), tmp_path / "calls.log"
    engine(path, available, log)
    stand_in(path, "kind", log)
    result = run(["scripts/kind-up.sh"], path, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    recorded = calls(log)

    kind = [c for c in recorded if c[0] == "kind"]
    provider = {"docker": "provider=", "podman": "provider=podman"}[available]
    assert all(c[1] == provider for c in kind), "kind is told to use Podman when only Podman is there"
    version = tools.versions()["KUBERNETES_VERSION"]
    assert ["create", "cluster", "--name", "slm-monitoring", "--image", f"kindest/node:{version}"] == kind[1][2:8]

    builds = {c[c.index("--tag") + 1]: c[-1] for c in recorded if c[0] == available and c[2] == "build"}
    assert builds == {image: str(REPO / context) for image, context in chart_default_images().items()}
    saved = [c[-1] for c in recorded if c[0] == available and c[2] == "save"]
    loads = [c[2:] for c in kind if c[2] == "load"]
    assert sorted(saved) == sorted(builds)
    assert len(loads) == 2 and all(c[:2] == ["load", "image-archive"] and c[-2:] == ["--name", "slm-monitoring"]
                                   for c in loads)


def test_kind_up_reuses_an_existing_cluster(tmp_path: Path) -> None:
    path, log = bare_path(tmp_path / "bin"), tmp_path / "calls.log"
    engine(path, "docker", log)
    stand_in(path, "kind", log, 'if [ "$1 $2" = "get clusters" ]; then echo slm-monitoring; fi')
    result = run(["scripts/kind-up.sh"], path, tmp_path)
    assert result.returncode == 0, result.stderr
    kind = [c[2:4] for c in calls(log) if c[0] == "kind"]
    assert ["create", "cluster"] not in kind and ["export", "kubeconfig"] in kind


def test_kind_up_without_kind_or_an_engine_says_what_is_missing(tmp_path: Path) -> None:
    path = bare_path(tmp_path / "bin")
    no_kind = run(["scripts/kind-up.sh"], path, tmp_path)
    assert no_kind.returncode != 0 and "kind is not installed" in no_kind.stderr
    stand_in(path, "kind", tmp_path / "calls.log")
    no_engine = run(["scripts/kind-up.sh"], path, tmp_path)
    assert no_engine.returncode != 0 and "neither 'docker' nor 'podman'" in no_engine.stderr


@pytest.mark.parametrize("available", ["docker", "podman"])
def test_make_images_with_push_prints_what_to_pin_the_chart_to(tmp_path: Path, available: str) -> None:
    """A release pushes both images and gets `image:tag@digest` back (docs/release.md)."""
    path, log = bare_path(tmp_path / "bin"), tmp_path / "calls.log"
    digest = "sha256:" + "ab" * 32
    # The stand-in registry: docker reports the pushed digest through `inspect`, podman in --digestfile.
    answer = {"docker": f'if [ "$1" = inspect ]; then for a; do r="$a"; done; echo "${{r%:*}}@{digest}"; fi',
              "podman": f'if [ "$1" = push ]; then printf "{digest}" >"$3"; fi'}[available]
    stand_in(path, available, log, answer)
    result = subprocess.run(["make", "images"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                            env={"PATH": str(path), "HOME": str(tmp_path), "IMAGE_PUSH": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(line for line in result.stdout.splitlines() if "@" in line) == sorted(
        f"{image}@{digest}" for image in chart_default_images())
    pushed = [c[3] if available == "docker" else c[-1] for c in calls(log) if c[2] == "push"]
    assert sorted(pushed) == sorted(chart_default_images())
