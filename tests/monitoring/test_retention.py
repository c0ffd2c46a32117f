"""Retention with a real Prometheus: samples older than `--storage.tsdb.retention.time` are gone, newer remain.

History is backfilled with `promtool tsdb create-blocks-from openmetrics` (how an SRE would import
it too); the same blocks opened with a retention longer than their age still answer, so the test
shows the deletion is retention's doing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from slm_devtools import dataplane as dp
from slm_devtools.tools import ToolMissing, tool

pytestmark = pytest.mark.dataplane

DAY = 86400


def _openmetrics(now: int) -> str:
    lines = ["# HELP slm_retention_probe Backfilled probe series.", "# TYPE slm_retention_probe gauge"]
    for age, start in (("old", now - 10 * DAY), ("new", now - 3600)):
        lines += [f'slm_retention_probe{{age="{age}"}} 1 {start + step * 60}' for step in range(10)]
    return "\n".join([*lines, "# EOF", ""])


def _block_ranges(data: Path) -> list[tuple[int, int]]:
    ranges = []
    for meta in data.glob("*/meta.json"):
        content = json.loads(meta.read_text())
        ranges.append((content["minTime"] // 1000, content["maxTime"] // 1000))
    return sorted(ranges)


def _present(prometheus: dp.Prometheus, age: str, at: int) -> bool:
    return bool(prometheus.query(f'slm_retention_probe{{age="{age}"}}', at=at))


def test_samples_older_than_retention_are_deleted_and_newer_kept(tmp_path: Path) -> None:
    try:
        promtool, _ = tool("promtool"), tool("prometheus")
    except ToolMissing as missing:
        pytest.skip(str(missing))
    now = int(time.time())
    source = tmp_path / "backfill.om"
    source.write_text(_openmetrics(now))
    blocks = tmp_path / "blocks"
    result = subprocess.run(
        [promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(blocks)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    old_at, new_at = now - 10 * DAY + 300, now - 3600 + 300
    assert any(lo <= old_at <= hi for lo, hi in _block_ranges(blocks)), "the old samples were not backfilled"

    # Control: a retention longer than the history keeps both.
    keep = tmp_path / "keep"
    shutil.copytree(blocks, keep / "data")
    control = dp.Prometheus(keep, extra_args=["--storage.tsdb.retention.time=30d"])
    with dp.running(control):
        control.start()
        dp.wait_until(lambda: _present(control, "old", old_at), timeout=30, what="old samples under 30d")
        assert _present(control, "new", new_at)

    # The retention under test: 2 days.
    trim = tmp_path / "trim"
    shutil.copytree(blocks, trim / "data")
    prometheus = dp.Prometheus(trim, extra_args=["--storage.tsdb.retention.time=2d"])
    with dp.running(prometheus):
        prometheus.start()
        dp.wait_until(lambda: _present(prometheus, "new", new_at), timeout=30, what="new samples kept")
        # The TSDB drops blocks beyond retention when it (re)loads them, at start and after compactions.
        dp.wait_until(
            lambda: not any(lo <= old_at <= hi for lo, hi in _block_ranges(trim / "data")),
            timeout=90, interval=1, what="old block deleted",
        )  # fmt: skip
        assert not _present(prometheus, "old", old_at)
        assert _present(prometheus, "new", new_at)
