"""Log shipping benchmark (issue 27's figures): what the chart's collector ships on one core, its memory,
and the lag from a line written to it being queryable in the store.

    .venv/bin/python bench/bench_logs.py [--lines 100000] [--lag-seconds 20] [--rate 1000] [--set VALUE] [--json OUT]

Runs slm_devtools.logplane: a local control plane (for the collector's k8sattributes), the chart's
collector (built by `make deps`, configuration from `helm template`) with GOMAXPROCS=1, and the chart's
VictoriaLogs. The lines are real request lines: the real server with the tiny model serves a few dozen
requests first, and its request lines, each given its own request_id, are replayed into a pod's CRI log
file.

1. Throughput: `--lines` lines are already in the file when the collector starts, and the store is
   polled until it holds them all. The figure compared with the goal is lines per CPU second of the
   collector (GOMAXPROCS=1, so one core at a time): what one dedicated core ships, whatever else the
   machine runs. Also printed: wall-clock lines/s with the share of a core the collector got, and its
   peak RSS.
2. Lag: lines written at `--rate` lines/s for `--lag-seconds`; every 50th is a probe whose arrival in
   the store is polled every 100 ms; p50/p95 of written -> queryable.

Goals (issue 27): >= 20,000 lines/s on one core; lag p95 <= 5 s at 1,000 lines/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slm_devtools.cluster import LocalCluster  # noqa: E402
from slm_devtools.dataplane import wait_until  # noqa: E402
from slm_devtools.logplane import (  # noqa: E402
    Collector,
    LogPlane,
    PodLogs,
    ServerPod,
    register_pod,
    server_pod_env,
    serving_pod,
)
from slm_devtools.tinymodel import ensure_tiny_model  # noqa: E402
from slm_operator import render  # noqa: E402
from slm_operator.spec import Parent, parse_spec  # noqa: E402

GOAL_LINES_PER_S = 20_000
GOAL_LAG_P95_S = 5.0
NODE = "cpu-node-0"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def memory_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def new_pod(cluster: LocalCluster, namespace: str, deployment: str) -> tuple[str, str, dict[str, Any]]:
    spec = parse_spec({"model": {"name": "tiny"}, "resources": {"gpus": 0}})
    rendered = render.render_deployment(Parent(deployment, namespace, str(uuid.uuid4())), spec,
                                        render.RenderContext(server_image="slm-server:bench"))  # fmt: skip
    name = f"{deployment}-{uuid.uuid4().hex[:10]}-{uuid.uuid4().hex[:5]}"
    manifest = serving_pod(rendered, name=name, node=NODE)
    return name, register_pod(cluster, namespace, manifest), manifest


def real_request_lines(plane: LogPlane, cluster: LocalCluster, namespace: str, workdir: Path) -> list[dict[str, Any]]:
    """The request lines of the real server after a few dozen requests (its pod's lines are shipped too)."""
    import httpx

    name, uid, manifest = new_pod(cluster, namespace, "bench-real")
    env = server_pod_env(manifest["spec"]["containers"][0], model_dir=ensure_tiny_model(), served_name="tiny",
                         workdir=workdir / "server")  # fmt: skip
    server = ServerPod(PodLogs(plane.pods_dir, namespace, name, uid, "server"), env, workdir / "server").start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for i in range(40):
                path = "/v1/completions" if i % 2 else "/v1/chat/completions"
                body: dict[str, Any] = {"model": "tiny", "max_tokens": 4 + i % 12, "temperature": 0.7, "seed": i}
                if i % 2:
                    body["prompt"] = f"Request {i}: the quick brown fox"
                else:
                    body["messages"] = [{"role": "user", "content": f"Request {i}: tell me about foxes"}]
                client.post(path, json=body).raise_for_status()
    finally:
        server.stop()
    lines = [r for r in server.records() if r.get("event") == "request"]
    assert len(lines) == 40, len(lines)
    return lines


def encoded(line: dict[str, Any], request_id: str) -> bytes:
    return json.dumps({**line, "request_id": request_id}, separators=(",", ":")).encode()


def count(plane: LogPlane, pod: str) -> int:
    assert plane.store is not None
    rows = plane.store.query(f'k8s.pod.name:="{pod}" | count() as n')
    return int(rows[0]["n"]) if rows else 0


def throughput(plane: LogPlane, cluster: LocalCluster, namespace: str, corpus: list[dict[str, Any]],
               total: int) -> dict[str, float]:  # fmt: skip
    assert plane.collector is not None
    name, uid, _ = new_pod(cluster, namespace, "bench-throughput")
    logs = PodLogs(plane.pods_dir, namespace, name, uid, "server")
    chunk = 5000
    for start in range(0, total, chunk):
        logs.write_many(encoded(corpus[i % len(corpus)], f"t-{i:07d}") for i in range(start, min(total, start + chunk)))
    size_mib = logs.path.stat().st_size / 2**20
    plane.collector.stop()  # a fresh start, on a file already written (its offsets of older files are kept)
    started = time.monotonic()
    plane.collector.start()
    assert plane.collector.proc is not None and plane.collector.proc.process is not None
    pid = plane.collector.proc.process.pid
    cpu_before = cpu_seconds(pid)
    wait_until(lambda: count(plane, name) >= total, timeout=900, interval=0.5, what=f"{total} lines in the store")
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu_before
    return {"lines": total, "file_mib": round(size_mib, 1), "seconds": round(elapsed, 2),
            "lines_per_s": round(total / elapsed), "collector_cpu_s": round(cpu, 2),
            "lines_per_cpu_s": round(total / cpu) if cpu else 0.0,
            "peak_rss_mib": round(memory_kib(pid, "VmHWM") / 1024, 1)}  # fmt: skip


def lag(plane: LogPlane, cluster: LocalCluster, namespace: str, corpus: list[dict[str, Any]], rate: float,
        seconds: float) -> dict[str, float]:  # fmt: skip
    assert plane.store is not None and plane.collector is not None and plane.collector.proc is not None
    name, uid, _ = new_pod(cluster, namespace, "bench-lag")
    logs = PodLogs(plane.pods_dir, namespace, name, uid, "server")
    written_at: dict[str, float] = {}
    arrived_at: dict[str, float] = {}
    total = int(rate * seconds)
    done = threading.Event()

    def write() -> None:
        began = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - began) * rate) + 1)
            batch = []
            for i in range(sent, due):
                request_id = f"probe-{i:07d}" if i % 50 == 0 else f"l-{i:07d}"
                batch.append(encoded(corpus[i % len(corpus)], request_id))
                if i % 50 == 0:
                    written_at[request_id] = time.time()
            logs.write_many(batch)
            sent = due
            time.sleep(0.01)
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + seconds + 60
    rss: list[int] = []
    pid = plane.collector.proc.process.pid  # type: ignore[union-attr]
    while time.monotonic() < deadline:
        for row in plane.store.query(f'k8s.pod.name:="{name}" request_id:probe* | fields request_id'):
            arrived_at.setdefault(row["request_id"], time.time())
        rss.append(memory_kib(pid, "VmRSS"))
        if done.is_set() and len(arrived_at) >= len(written_at):
            break
        time.sleep(0.1)
    lags = sorted(arrived_at[k] - written_at[k] for k in written_at if k in arrived_at)
    assert len(lags) == len(written_at), f"{len(written_at) - len(lags)} probes never arrived"
    return {"rate": rate, "seconds": seconds, "probes": len(lags),
            "lag_p50_s": round(statistics.median(lags), 3),
            "lag_p95_s": round(lags[max(0, int(len(lags) * 0.95) - 1)], 3),
            "lag_max_s": round(lags[-1], 3),
            "rss_mib_while_shipping": round(max(rss) / 1024, 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--lag-seconds", type=float, default=20.0)
    parser.add_argument("--set", action="append", default=[], metavar="VALUE",
                        help="a chart value (helm --set), e.g. logs.collector.exporter.compression=zstd")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as tmp, LocalCluster.start(Path(tmp) / "cluster") as cluster:
        namespace = cluster.new_namespace("bench")
        plane = LogPlane(cluster, Path(tmp) / "node", NODE, set_values=args.set)
        original = Collector.environment

        def one_core(self: Collector) -> dict[str, str]:  # GOMAXPROCS=1: the collector's Go runtime on one core
            return {**original(self), "GOMAXPROCS": "1"}

        Collector.environment = one_core  # type: ignore[method-assign]
        try:
            plane.start()
            corpus = real_request_lines(plane, cluster, namespace, Path(tmp))
            mean_bytes = statistics.mean(len(encoded(line, "t-0000000")) for line in corpus)
            shipped = throughput(plane, cluster, namespace, corpus, args.lines)
            delays = lag(plane, cluster, namespace, corpus, args.rate, args.lag_seconds)
        finally:
            plane.stop()
            Collector.environment = original  # type: ignore[method-assign]
    result = {"values": args.set, "mean_line_bytes": round(mean_bytes), "throughput": shipped, "lag": delays, "goals": {
        "lines_per_s": GOAL_LINES_PER_S, "lag_p95_s": GOAL_LAG_P95_S}}  # fmt: skip
    print(json.dumps(result, indent=2))
    share = shipped["collector_cpu_s"] / shipped["seconds"]
    print(f"shipped {shipped['lines_per_cpu_s']:,} lines per CPU second with GOMAXPROCS=1 (one core's worth): goal >= "
          f"{GOAL_LINES_PER_S:,} {'met' if shipped['lines_per_cpu_s'] >= GOAL_LINES_PER_S else 'NOT met'}; wall clock "
          f"{shipped['lines_per_s']:,} lines/s with {share:.0%} of a core (what other processes left); "
          f"peak RSS {shipped['peak_rss_mib']} MiB")
    print(f"lag at {args.rate:g} lines/s: p50 {delays['lag_p50_s']} s, p95 {delays['lag_p95_s']} s: goal p95 <= "
          f"{GOAL_LAG_P95_S} s {'met' if delays['lag_p95_s'] <= GOAL_LAG_P95_S else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
