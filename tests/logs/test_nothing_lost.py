"""Nothing lost: the collector stopped or killed mid-stream resumes from its checkpointed offsets, and
a store that is down for 30 s gets every line from the sending queue once it is back.

The lines come from `Replayer` (a stand-in for the server: thousands of request lines at a steady rate,
which the tiny model on two shared cores cannot serve; test_completeness ships the real server's lines).
"""

from __future__ import annotations

from typing import Any

import pytest

from slm_devtools.dataplane import wait_until
from slm_devtools.logplane import LogPlane
from tests.logs.conftest import Pod, Replayer, counts_by_request_id

pytestmark = [pytest.mark.e2e, pytest.mark.dataplane, pytest.mark.slow]


def _all_arrived(plane: LogPlane, pod: Pod, replayer: Replayer, timeout: float) -> dict[str, int]:
    """Wait until every id is in the store; the count of each."""
    assert plane.store is not None and plane.collector is not None and plane.collector.proc is not None
    counts: dict[str, int] = {}

    def complete() -> bool:
        nonlocal counts
        plane.collector.proc.check_running()  # type: ignore[union-attr]
        entries = plane.store.query(f'k8s.pod.name:="{pod.name}" | fields request_id')  # type: ignore[union-attr]
        counts = counts_by_request_id(entries, replayer.prefix)
        return len(counts) == replayer.total

    try:
        wait_until(complete, timeout=timeout, interval=1.0, what="every line in the store")
    except Exception as error:
        missing = sorted(set(replayer.ids()) - set(counts))
        raise AssertionError(f"{error}; {len(missing)} of {replayer.total} missing, e.g. {missing[:5]}") from None
    return counts


def test_collector_stopped_and_restarted_mid_stream_ships_every_line_once(plane: LogPlane, new_pod: Any) -> None:
    """SIGTERM, as the kubelet stops the collector on a rollout or a node drain: it saves its offsets
    and queue, and the new one resumes at the next line."""
    assert plane.collector is not None
    pod: Pod = new_pod("stopped-collector")
    replayer = Replayer(pod.logs(plane), total=3000, rate=300).start()
    replayer.wait_written(800, timeout=30)
    plane.collector.stop()
    replayer.wait_written(1600, timeout=30)  # lines written while no collector runs
    plane.collector.start()
    replayer.join(timeout=60)
    counts = _all_arrived(plane, pod, replayer, timeout=120)
    assert sorted(counts.values()) == [1] * 3000


def test_collector_killed_mid_stream_loses_no_line(plane: LogPlane, new_pod: Any) -> None:
    """SIGKILL (a crash, an out-of-memory kill) gives no chance to save anything: the lines read since
    the last checkpoint are read again (at-least-once), none is lost. The collector saves its offsets
    after every poll (200 ms) once the lines it read are in the queue on disk, so only lines of the
    poll the kill cut short can arrive twice: at most one poll's worth."""
    assert plane.collector is not None
    pod: Pod = new_pod("killed-collector")
    replayer = Replayer(pod.logs(plane), total=3000, rate=300).start()
    replayer.wait_written(800, timeout=30)
    plane.collector.kill()
    replayer.wait_written(1600, timeout=30)
    plane.collector.start()
    replayer.join(timeout=60)
    counts = _all_arrived(plane, pod, replayer, timeout=120)
    twice = [request_id for request_id, count in counts.items() if count > 1]
    assert all(count <= 2 for count in counts.values())
    assert len(twice) <= 300, f"{len(twice)} lines arrived twice: more than the poll the kill cut short"


def test_store_down_for_30_seconds_then_back_gets_every_line_once(plane: LogPlane, new_pod: Any) -> None:
    """The store stops for 30 s (an upgrade, a crash) while lines keep coming: they wait in the
    collector's sending queue on disk and arrive once it is back, each once."""
    assert plane.store is not None and plane.collector is not None
    pod: Pod = new_pod("store-down")
    rate = 200
    replayer = Replayer(pod.logs(plane), total=rate * 45, rate=rate).start()
    replayer.wait_written(rate * 5, timeout=30)
    plane.store.stop()
    down_from = replayer.written
    # The outage lasts while the replayer writes 30 seconds' worth of lines.
    replayer.wait_written(down_from + rate * 30, timeout=60)
    queued = plane.collector.metric("otelcol_exporter_queue_size")
    plane.store.start()
    replayer.join(timeout=60)
    counts = _all_arrived(plane, pod, replayer, timeout=180)
    assert queued > 0, "the lines written during the outage were not in the sending queue"
    assert sorted(counts.values()) == [1] * replayer.total
