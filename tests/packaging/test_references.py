"""Comments, docstrings and docs name only files that exist in the repository.

A file renamed or removed leaves its old name behind in comments; a reader who follows it finds
nothing. Any path that starts at one of the repository's top-level folders is checked; paths with
placeholders (``*``, ``…``, ``...``, ``<x>``, ``$VAR``, ``{x}``) are patterns, not names, and are skipped.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEXT = (".py", ".sh", ".go", ".yaml", ".yml", ".toml", ".md", ".tpl", ".j2", ".json", "Makefile", "Dockerfile")
ROOTS = sorted(p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith("."))
# A path from a top-level folder to a file with an extension (prose like "operator/demo" is not one).
PATH = re.compile(r"(?<![\w./${<-])((?:" + "|".join(map(re.escape, ROOTS)) + r")/[\w./-]*\.[A-Za-z]\w*)\b")
PLACEHOLDER = re.compile(r"[*…<>{}$]|\.\.\.")


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split() if f.endswith(TEXT) and (REPO / f).is_file()]


def test_no_reference_outside_the_repository() -> None:
    offenders = [f for f in tracked() if "../shared" in (REPO / f).read_text(errors="replace")]
    assert offenders == [], f"files citing ../shared (outside the repository): {offenders}"


def test_every_named_repository_path_exists() -> None:
    missing: list[str] = []
    for f in tracked():
        if f.startswith(("tests/operator/golden/",)) or f.endswith(".lock"):
            continue
        for line_no, line in enumerate((REPO / f).read_text(errors="replace").splitlines(), 1):
            for m in PATH.finditer(line):
                name = m.group(1).rstrip(".")
                if PLACEHOLDER.search(line[m.start() : m.end() + 1]):
                    continue
                if not (REPO / name).exists():
                    missing.append(f"{f}:{line_no}: {name}")
    assert missing == [], "paths named but not in the repository:\n" + "\n".join(missing)
