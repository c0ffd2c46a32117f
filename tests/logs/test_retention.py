"""Retention: the store keeps lines for `logs.retention` (VictoriaLogs' own `-retentionPeriod`, as the
chart renders it): older lines are not kept, newer ones survive a restart of the store."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from slm_devtools.cluster import ClusterBase
from slm_devtools.localpods import cri_time
from slm_devtools.logplane import log_plane, wait_for_entries
from tests.logs.conftest import REQUEST_LINE, Pod

pytestmark = [pytest.mark.e2e, pytest.mark.dataplane, pytest.mark.slow]
DAY = 86400.0


def _line(request_id: str, at: float) -> str:
    stamp = cri_time(at)[:23] + "Z"  # the server's millisecond RFC 3339
    return json.dumps({**REQUEST_LINE, "request_id": request_id, "timestamp": stamp})


def test_lines_older_than_the_retention_are_not_kept_and_newer_ones_survive_a_restart(
    cluster: ClusterBase, node: str, new_pod: Any, tmp_path: Any
) -> None:
    with log_plane(cluster, tmp_path / "node", node, set_values=["logs.retention=1d"]) as plane:
        assert plane.store is not None and plane.collector is not None
        assert "-retentionPeriod=1d" in plane.store.args()
        pod: Pod = new_pod("retention")
        logs = pod.logs(plane)
        now = time.time()
        # Each line as the runtime stamps it when written then (a node's clock, old logs replayed).
        written = {"three-days-old": now - 3 * DAY, "two-days-old": now - 2 * DAY, "two-hours-old": now - 7200,
                   "a-minute-old": now - 60, "now": now}
        for request_id, at in written.items():
            logs.write(_line(request_id, at), at=at)
        logs.write(_line("marker", time.time()))
        selector = f'k8s.pod.name:="{pod.name}"'
        check = plane.collector.proc.check_running  # type: ignore[union-attr]
        wait_for_entries(plane.store, f"{selector} request_id:=marker", 1, timeout=90, check=check)

        kept = {e["request_id"] for e in plane.store.query(selector)}
        assert kept == {"two-hours-old", "a-minute-old", "now", "marker"}
        # The store refused the old ones when they came (they reached it: nothing lost on the way).
        assert plane.store.metric("vl_rows_dropped_total", {"reason": "too_small_timestamp"}) == 2

        plane.store.stop()
        plane.store.start()
        after_restart = {e["request_id"] for e in plane.store.query(selector)}
        assert after_restart == {"two-hours-old", "a-minute-old", "now", "marker"}
