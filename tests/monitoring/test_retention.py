"""Retention as kube-prometheus-stack users set it: `spec.retention` of a Prometheus resource.

The Prometheus Operator turns `retention` into Prometheus' `--storage.tsdb.retention.time`; the pod it
generates runs here (slm_devtools.promstack) on a TSDB seeded with history backfilled by
`promtool tsdb create-blocks-from openmetrics` (how an SRE would import it too). Samples older than the
retention are gone, newer remain; the same blocks under a resource with a retention longer than their
age still answer, so the test shows the deletion is retention's doing.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from slm_devtools import dataplane as dp
from slm_devtools.promstack import PrometheusAPI, PrometheusStack, running_prometheus
from slm_devtools.tools import tool

pytestmark = [pytest.mark.e2e, pytest.mark.dataplane]

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


def _present(prometheus: PrometheusAPI, age: str, at: int) -> bool:
    return bool(prometheus.query(f'slm_retention_probe{{age="{age}"}}', at=at))


def test_samples_older_than_retention_are_deleted_and_newer_kept(tmp_path: Path,
                                                                 prometheus_stack: PrometheusStack) -> None:
    promtool = tool("promtool")
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
    suffix = uuid.uuid4().hex[:5]
    stack, namespace = prometheus_stack, prometheus_stack.namespace

    def run(name: str, retention: str) -> tuple[dp.LocalPod, PrometheusAPI]:
        pod, api = running_prometheus(stack, name, namespace=namespace, retention=retention, seed=blocks)
        assert f"--storage.tsdb.retention.time={retention}" in pod.pod["spec"]["containers"][0]["args"]
        return pod, api

    try:
        # Control: a retention longer than the history keeps both.
        control_pod, control = run(f"keep-{suffix}", "30d")
        dp.wait_until(lambda: _present(control, "old", old_at), timeout=30, what="old samples under 30d")
        assert _present(control, "new", new_at)
        stack.kubelet.stop_pod(control_pod)

        # The retention under test: 2 days.
        trim_pod, prometheus = run(f"trim-{suffix}", "2d")
        data = trim_pod.volume_dir(f"prometheus-trim-{suffix}-db")
        dp.wait_until(lambda: _present(prometheus, "new", new_at), timeout=30, what="new samples kept")
        # The TSDB drops blocks beyond retention when it (re)loads them, at start and after compactions.
        dp.wait_until(
            lambda: not any(lo <= old_at <= hi for lo, hi in _block_ranges(data)),
            timeout=90, interval=1, what="old block deleted",
        )  # fmt: skip
        assert not _present(prometheus, "old", old_at)
        assert _present(prometheus, "new", new_at)
    finally:
        for name in (f"keep-{suffix}", f"trim-{suffix}"):
            stack.cluster.kubectl("delete", "prometheus", name, "-n", namespace, "--wait=false", check=False)
        for pod in [p for p in stack.kubelet.pods if p.name.startswith((f"prometheus-keep-{suffix}",
                                                                         f"prometheus-trim-{suffix}"))]:
            stack.kubelet.stop_pod(pod)
