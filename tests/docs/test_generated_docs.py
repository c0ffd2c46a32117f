"""Generated documentation is in step with its source: a stale reference page fails the build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_reference_pages_match_their_sources() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_readme_starts_with_the_two_commands() -> None:
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    commands = [line.split("#")[0].strip() for line in lines[1:3]]
    assert lines[0].startswith("```")
    assert commands == ["make demo", "make test"]
    assert lines[3] == "```"
