#!/usr/bin/env python3
"""Checks every image this repository pins by digest against its registry, and bumps pins.

The pins: the base images of operator/Dockerfile and server/Dockerfile (`FROM image:tag@sha256:…`) and the
third-party images of the chart (every `repository`/`tag`/`digest` triple in values.yaml). For each, the
registry is asked what the tag points to now, with `crane digest IMAGE:TAG`, else `docker buildx imagetools
inspect IMAGE:TAG` (both print the digest of the multi-platform index, which is what a pin must hold).

    .venv/bin/python scripts/image_digests.py            # make image-digests: report, exit 1 if a tag moved
    .venv/bin/python scripts/image_digests.py --update   # write the current digest of each tag into its file

To move to a new tag, edit the tag (in the FROM line or in values.yaml) and run with --update: the digest
next to it is replaced by the new tag's. A moved tag (a rebuilt base image under the same name) is reported,
never followed silently. Exit status: 0 all pins current (or updated), 1 a pin differs, 2 no registry tool.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dockerfile
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = (REPO_ROOT / "operator" / "Dockerfile", REPO_ROOT / "server" / "Dockerfile")
VALUES = REPO_ROOT / "charts" / "slm-monitoring" / "values.yaml"
_PINNED = re.compile(r"^(?P<image>[^@\s]+):(?P<tag>[^:@/\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")


@dataclass(frozen=True)
class Pin:
    image: str
    tag: str
    digest: str
    file: Path

    @property
    def reference(self) -> str:
        return f"{self.image}:{self.tag}"


def dockerfile_pins(path: Path) -> Iterator[Pin]:
    stages: set[str] = set()
    for command in dockerfile.parse_file(str(path)):
        if command.cmd != "FROM":
            continue
        base, *alias = command.value
        if base not in stages:
            match = _PINNED.match(base)
            if not match:
                raise SystemExit(f"{path.relative_to(REPO_ROOT)}: FROM {base} is not image:tag@sha256:<digest>")
            yield Pin(match["image"], match["tag"], match["digest"], path)
        if alias:
            stages.add(alias[-1])


def values_pins(node: Any, path: Path = VALUES) -> Iterator[Pin]:
    """Every mapping with a repository, a tag and a non-empty digest (the project's own images have none)."""
    if isinstance(node, dict):
        if node.get("digest") and node.get("repository") and node.get("tag"):
            yield Pin(str(node["repository"]), str(node["tag"]), str(node["digest"]), path)
        for child in node.values():
            yield from values_pins(child, path)


def pins() -> list[Pin]:
    found = [pin for path in DOCKERFILES for pin in dockerfile_pins(path)]
    found += values_pins(yaml.safe_load(VALUES.read_text()))
    return list(dict.fromkeys(found))  # a base image used by two stages is one pin


def current_digest(reference: str) -> str:
    """What the registry serves for the tag now: the digest of its index (or of its only manifest)."""
    if shutil.which("crane"):
        argv = ["crane", "digest", reference]
    elif shutil.which("docker") and subprocess.run(["docker", "buildx", "version"], capture_output=True,
                                                   timeout=30, check=False).returncode == 0:
        argv = ["docker", "buildx", "imagetools", "inspect", reference, "--format", "{{json .Manifest.Digest}}"]
    else:
        print("image-digests: needs `crane` (https://github.com/google/go-containerregistry) or Docker with "
              "buildx to ask the registries.", file=sys.stderr)
        raise SystemExit(2)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    digest = result.stdout.strip().strip('"')
    if result.returncode != 0 or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="write each tag's current digest into its file")
    args = parser.parse_args(argv)
    differing = 0
    for pin in pins():
        where = pin.file.relative_to(REPO_ROOT)
        try:
            now = current_digest(pin.reference)
        except RuntimeError as exc:
            print(f"error  {pin.reference} ({where}): {exc}")
            differing += 1
            continue
        if now == pin.digest:
            print(f"ok     {pin.reference}@{pin.digest} ({where})")
        elif args.update:
            pin.file.write_text(pin.file.read_text().replace(pin.digest, now))
            print(f"bumped {pin.reference} ({where}): {pin.digest} -> {now}")
        else:
            print(f"moved  {pin.reference} ({where}): pinned {pin.digest}, the registry serves {now}")
            differing += 1
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
