"""A test that needs a pinned binary `make deps` has not built fails, saying so; it never skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from slm_devtools.tools import REPO_ROOT

TESTS = '''
import pytest
from slm_devtools.tools import ToolMissing, tool

def test_that_skips_when_the_tool_is_missing():
    try:
        tool("no-such-tool")
    except ToolMissing as missing:
        pytest.skip(str(missing))

def test_that_needs_the_tool():
    tool("no-such-tool")

def test_skipped_for_another_reason():
    pytest.skip("a reason that is not a missing tool")
'''


def test_a_skip_for_a_missing_tool_is_reported_as_a_failure_naming_make_deps(tmp_path: Path) -> None:
    (tmp_path / "test_needs_tool.py").write_text(TESTS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.plugins.cluster", "-p", "no:cacheprovider", "-q", "-rfs",
         str(tmp_path / "test_needs_tool.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "SLM_BIN_DIR": str(tmp_path / "empty-bin")},
    )
    out = result.stdout
    assert "2 failed, 1 skipped" in out, out
    assert ("a tool this test needs is missing (a failure, never a skip): no-such-tool not found in "
            f"{tmp_path / 'empty-bin'}: run `make deps`") in out, out
    assert "a reason that is not a missing tool" in out
