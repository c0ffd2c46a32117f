"""scripts/image_digests.py (`make image-digests`): finds every digest pin, reports a tag that moved, and
bumps pins.

The registries are out of reach here, so a stand-in `crane` (a script answering `crane digest IMAGE:TAG`
from a table) plays the registry; the pins it is asked about are read from the real files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile

from slm_devtools.tools import REPO_ROOT
from tests.chart.chartlib import documents, render

SCRIPT = REPO_ROOT / "scripts" / "image_digests.py"
FILES = ("operator/Dockerfile", "server/Dockerfile", "charts/slm-monitoring/values.yaml")


def pinned_in_repo() -> set[str]:
    """image:tag@digest of every Dockerfile base and every pinned image the chart renders (DCGM and logs on)."""
    found = {c.value[0] for f in FILES[:2] for c in dockerfile.parse_file(str(REPO_ROOT / f))
             if c.cmd == "FROM" and "@" in c.value[0]}
    for doc in documents(render(set_values=["dcgmExporter.enabled=true", "logs.enabled=true"])):
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            if "@sha256:" in container["image"]:
                found.add(container["image"])
    return found


def registry(tmp_path: Path, table: dict[str, str]) -> Path:
    """A directory with a `crane` that answers `crane digest REF` from `table`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answers = tmp_path / "registry.txt"
    answers.write_text("".join(f"{ref} {digest}\n" for ref, digest in table.items()))
    crane = bin_dir / "crane"
    crane.write_text(f'#!/bin/sh\n[ "$1" = digest ] || exit 2\nawk -v r="$2" \'$1 == r {{print $2; f=1}} '
                     f'END {{exit !f}}\' "{answers}" || {{ echo "MANIFEST_UNKNOWN: $2" >&2; exit 1; }}\n')
    crane.chmod(0o755)
    return bin_dir


def run(script: Path, bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60,
                          check=False, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})


def current(pins: set[str]) -> dict[str, str]:
    return {pin.split("@")[0]: pin.split("@")[1] for pin in pins}


def test_every_pin_is_checked_and_current_pins_pass(tmp_path: Path) -> None:
    pins = pinned_in_repo()
    assert len(current(pins)) >= 5  # python base, DCGM exporter, kubectl, busybox, log collector
    result = run(SCRIPT, registry(tmp_path, current(pins)))
    assert result.returncode == 0, result.stdout + result.stderr
    reported = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")}
    assert reported == pins


def test_a_moved_tag_is_reported_and_fails(tmp_path: Path) -> None:
    table = current(pinned_in_repo())
    moved = "docker.io/library/busybox:1.37.0"
    table[moved] = "sha256:" + "1" * 64
    result = run(SCRIPT, registry(tmp_path, table))
    assert result.returncode == 1
    assert f"moved  {moved} (charts/slm-monitoring/values.yaml): pinned {current(pinned_in_repo())[moved]}, " \
           f"the registry serves sha256:{'1' * 64}" in result.stdout


def test_update_writes_the_new_tags_digest_into_the_file(tmp_path: Path) -> None:
    """The bump: edit a tag, run with --update, the digest beside it is the new tag's (in a copy)."""
    copy = tmp_path / "repo"
    for relative in (*FILES, "scripts/image_digests.py"):
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / relative, copy / relative)
    values = copy / "charts/slm-monitoring/values.yaml"
    values.write_text(values.read_text().replace('tag: "1.37.0"', 'tag: "1.37.1"'))
    table = current(pinned_in_repo()) | {"docker.io/library/busybox:1.37.1": "sha256:" + "2" * 64}
    served = registry(tmp_path, table)
    result = run(copy / "scripts/image_digests.py", served, "--update")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "digest: sha256:" + "2" * 64 in values.read_text()
    assert "bumped docker.io/library/busybox:1.37.1" in result.stdout
    assert run(copy / "scripts/image_digests.py", served).returncode == 0  # and now it is current


def test_without_crane_or_buildx_it_says_what_it_needs(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False,
                            env={"PATH": str(empty)})
    assert result.returncode == 2 and "needs `crane`" in result.stderr
