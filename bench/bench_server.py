"""Server monitoring overhead benchmark.

    .venv/bin/python bench/bench_server.py [--requests 1000] [--rounds 20] [--processes 4] [--http-rounds 4]
                                           [--tiny-requests 50] [--json OUT] [--before DIR]

    # this server against main's, in the same rounds:
    git archive main | tar -x -C /tmp/main-tree && .venv/bin/python bench/bench_server.py --before /tmp/main-tree

Variants of the same app, all on the no-op `EchoEngine` (so no model time hides the overhead),
measured in one run (one worker process per variant, see below):

  uninstrumented      create_app(metrics_enabled=False, log_requests=False): serving as with monitoring
                      (the request middleware's request ids and body cap, admission, the request
                      record) but no metrics, no request logs, no timing, no output hash
  instrumented        request timing in the middleware, every slm_* metric, one JSON log line per
                      request (encoded and written to /dev/null inside the measured time), output
                      hashing
  metrics-only        instrumented without the request log line (how the cost splits)
  instrumented+drift  instrumented + the drift detector of slm_server.drift (the server's default)
  instrumentator      the uninstrumented app + prometheus-fastapi-instrumentator's defaults

In process: each request is POST /generate driven straight through the ASGI interface (no
sockets, no HTTP client: their cost would dilute the difference being measured). Each variant
lives in its own worker process (several apps in one interpreter slow each other down through the
interpreter's shared caches: on this project's 2-core VM the same app measured 30 µs/request
slower when it was the fourth app built than when it was the second). Processes are not equal
either: two workers of the same variant differ by up to 20 µs/request for the life of the process
(where the allocator and the hash seed happened to put things), so each variant runs in
`--processes` workers (4 by default) and a round's figure for a variant is the mean of its
workers' blocks. The parent runs the blocks one worker at a time, in a shuffled order each round;
each block is timed in CPU time of its worker process (time.process_time: every thread, the log
flusher's included, and no other process) and ends with the block's log lines flushed. Ratios and
costs are the medians of per-round pairs.
A block is 1,000 requests (~0.2 s: the log lines are written in batches of 32 and by the flusher
every 0.1 s meanwhile, as in a server). Each block starts with the CPU caches full of the previous
worker's data, a cost per block that a serving process does not pay every few hundred requests
and that weighs on the variant with more code and data per request; longer blocks spread it
thinner. The machine's own
state moves the figures more than that: on the project's shared 2-core VM the same code and
arguments gave instrumented / uninstrumented from 0.868 to 0.902 within two hours.
Reported: requests/s per variant, the ratios to the uninstrumented app (goal: instrumented above
the instrumentator), the monitoring cost per request in µs against a request to the project's tiny
model (goal: at most 1 % of it; measured in the same run, `--tiny-requests` POST /generate of 8
tokens through the same app with the real engine, wall time), the /metrics render time and size at
the default series count (goal <= 20 ms), and how long a full garbage collection stops the serving
process with the start-up objects frozen (as slm_server.app leaves them) and without. The cost goal
is a share of a real request because that is what a user pays: below it, the server's metrics are
plain prometheus_client, written for reading rather than for microseconds. Medians of blocks
leave out the rare block that holds a full collection;
the HTTP figures below, CPU totals, do not.

Over HTTP: the uninstrumented, instrumented and instrumentator apps under uvicorn (uvloop and
httptools, as `slm-server` runs), each in `--processes` server processes on 127.0.0.1, driven by
keep-alive requests from this process; the servers' own CPU time per request is read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import multiprocessing
import os
import random
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The server measured: this checkout's, or in the workers of the `@before` variants (--before) another
# checkout's (the parent sets this for them).
sys.path.insert(0, os.environ.get("SLM_BENCH_SERVER_DIR") or str(REPO / "server"))

from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.exposition import generate_latest  # noqa: E402

from slm_server.app import create_app  # noqa: E402

try:
    from slm_server.generation.echo_engine import EchoEngine
except ImportError:  # a --before checkout from before slm_server.generation
    from slm_server.engine import EchoEngine  # type: ignore[no-redef]
from slm_server.logs import configure_logging, flush_lines  # noqa: E402
from slm_server.settings import Settings  # noqa: E402
from slm_server.signals import NoopObserver  # noqa: E402

BODY = json.dumps({"prompt": "one two three four five six seven eight", "max_tokens": 8}).encode()
GOALS = {"share_of_tiny_request": 0.01, "metrics_ms": 20.0}
TINY_BODY = json.dumps({"prompt": "one two three four five six seven eight", "max_tokens": 8, "ignore_eos": True})


def _settings(**overrides: Any) -> Settings:
    return Settings(model="echo", served_model_name="echo", engine="echo", **overrides)


def _engine(settings: Settings) -> EchoEngine:
    engine = EchoEngine(settings)
    engine.load()
    return engine


VARIANTS = ("uninstrumented", "instrumented", "metrics-only", "instrumented+drift", "instrumentator")
BEFORE = ("uninstrumented@before", "instrumented@before")  # with --before: another checkout's server


def build_variant(name: str) -> tuple[Any, CollectorRegistry | None]:
    """The app of one variant, and its registry when /metrics is measured on it."""
    name = name.removesuffix("@before")  # the same app, from the server this worker imported
    if name == "uninstrumented":
        s = _settings(metrics_enabled=False, log_requests=False)
        return create_app(s, engine=_engine(s)), None
    if name == "instrumented":  # metrics + logs; the drift detector (issue 7) is its own variant
        s, registry = _settings(), CollectorRegistry()
        return create_app(s, engine=_engine(s), registry=registry, signals=NoopObserver()), registry
    if name == "metrics-only":
        s = _settings(log_requests=False)
        return create_app(s, engine=_engine(s), registry=CollectorRegistry(), signals=NoopObserver()), None
    if name == "instrumented+drift":
        s, registry = _settings(), CollectorRegistry()
        return create_app(s, engine=_engine(s), registry=registry), registry
    if name == "instrumentator":
        from prometheus_fastapi_instrumentator import Instrumentator

        s, registry = _settings(metrics_enabled=False, log_requests=False), CollectorRegistry()
        app = create_app(s, engine=_engine(s))
        Instrumentator(registry=registry).instrument(app).expose(app)
        return app, registry
    raise ValueError(name)


def _scope(path: str, method: str = "POST") -> dict[str, Any]:
    headers = [(b"host", b"bench"), (b"content-type", b"application/json")]
    if method == "POST":
        headers.append((b"content-length", str(len(BODY)).encode()))
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


async def call(app: Any, path: str = "/generate", method: str = "POST", body: bytes = BODY) -> tuple[int, bytes]:
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body if method == "POST" else b"", "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(_scope(path, method), receive, send)
    return status, b"".join(chunks)


def worker(name: str, conn: Connection) -> None:
    """One variant in its own process: answers `("block", n)` with the CPU µs per request of n
    requests, `("metrics",)` with the /metrics figures, and stops on `("stop",)`."""
    # The request logs really are encoded and written (to /dev/null), as the server writes them:
    # in batches of 32 and by the flusher thread every log_flush_interval_seconds (its CPU time counted).
    with open(os.devnull, "wb") as sink:
        handler = configure_logging(_settings(), stream=sink)
        try:
            asyncio.run(_serve_commands(name, conn))
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


async def _serve_commands(name: str, conn: Connection) -> None:
    app, registry = build_variant(name)
    async with _lifespans([app]):
        for _ in range(300):  # warm-up and sanity
            status, body = await call(app)
        if status != 200:
            conn.send(("error", f"{name}: {status} {body[:200]!r}"))
            return
        conn.send(("ready", name))
        while True:
            command = conn.recv()
            if command[0] == "block":
                start = time.process_time()
                for _ in range(command[1]):
                    await call(app)
                flush_lines()  # the block's log lines are encoded and written inside its time
                conn.send((time.process_time() - start) / command[1] * 1e6)
            elif command[0] == "metrics":
                conn.send(await _metrics_figures(app, registry))
            else:
                return


async def _metrics_figures(app: Any, registry: CollectorRegistry | None) -> dict[str, Any]:
    assert registry is not None
    render_ms = []
    for _ in range(50):
        start = time.perf_counter()
        text = generate_latest(registry)
        render_ms.append((time.perf_counter() - start) * 1000)
    series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
    route_ms = []
    for _ in range(20):
        start = time.perf_counter()
        route_status, route_body = await call(app, "/metrics", "GET")
        route_ms.append((time.perf_counter() - start) * 1000)
    assert route_status == 200
    return {
        **_full_collection_ms(),
        "metrics_render_ms": statistics.median(render_ms),
        "metrics_route_ms": statistics.median(route_ms),
        "metrics_bytes": len(route_body),
        "metrics_series": series,
    }


def _full_collection_ms() -> dict[str, float]:
    """A full garbage collection in the serving process (no request moves meanwhile), with the
    start-up objects frozen as the app leaves them (slm_server.app), and with them thawed."""

    def best_of_five() -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            gc.collect()
            times.append((time.perf_counter() - start) * 1000)
        return min(times)

    frozen = best_of_five()
    gc.unfreeze()
    try:
        thawed = best_of_five()
    finally:
        gc.freeze()
    return {"full_gc_ms": frozen, "full_gc_unfrozen_ms": thawed}


def run(requests: int, rounds: int, processes: int = 4, before: Path | None = None) -> dict[str, Any]:
    """Per variant, `rounds` blocks of `requests` requests on each of its `processes` workers,
    interleaved across all the workers. With `before` (another checkout's root), also the
    uninstrumented and instrumented apps of its server, in the same rounds."""
    ctx = multiprocessing.get_context("spawn")
    workers: dict[tuple[str, int], tuple[Any, Connection]] = {}
    variants = VARIANTS + (BEFORE if before else ())
    try:
        for name in variants:
            for index in range(processes):
                parent, child = ctx.Pipe()
                process = ctx.Process(target=worker, args=(name, child), name=f"bench-{name}-{index}", daemon=True)
                if name.endswith("@before"):  # spawned: the worker imports the server from sys.path anew
                    assert before is not None
                    os.environ["SLM_BENCH_SERVER_DIR"] = str(before / "server")
                try:
                    process.start()
                finally:
                    os.environ.pop("SLM_BENCH_SERVER_DIR", None)
                workers[name, index] = (process, parent)
        for _, conn in workers.values():
            reply = conn.recv()
            if reply[0] != "ready":
                raise SystemExit(reply[1])
        per_request_us: dict[str, list[float]] = {name: [] for name in variants}
        order = list(workers)
        shuffle = random.Random(4)
        for _ in range(rounds):
            shuffle.shuffle(order)  # no worker always runs first (or right after another) in a round
            block_us: dict[str, list[float]] = {name: [] for name in variants}
            for key in order:
                conn = workers[key][1]
                conn.send(("block", requests))
                block_us[key[0]].append(conn.recv())
            for name, values in block_us.items():
                per_request_us[name].append(statistics.fmean(values))
        workers["instrumented", 0][1].send(("metrics",))
        figures = workers["instrumented", 0][1].recv()
    finally:
        for process, conn in workers.values():
            if process.is_alive():
                conn.send(("stop",))
            process.join(timeout=30)
    us = {name: statistics.median(values) for name, values in per_request_us.items()}

    # Ratios and costs are paired by round (blocks run back to back), then the median is taken:
    # a machine that slows down for a while moves both sides of a pair alike.
    def ratio(name: str, base: str = "uninstrumented") -> float:
        return statistics.median(b / v for b, v in zip(per_request_us[base], per_request_us[name], strict=True))

    def cost(name: str, base: str = "uninstrumented") -> float:
        return statistics.median(v - b for b, v in zip(per_request_us[base], per_request_us[name], strict=True))

    return {
        "requests_per_block": requests,
        "rounds": rounds,
        "processes_per_variant": processes,
        "us_per_request": {name: round(value, 1) for name, value in us.items()},
        "rps": {name: round(1e6 / value, 1) for name, value in us.items()},
        "ratio_instrumented": ratio("instrumented"),
        "ratio_instrumentator": ratio("instrumentator"),
        "ratio_instrumented_drift": ratio("instrumented+drift"),
        "cost_us_per_request": cost("instrumented"),
        "metrics_only_us_per_request": cost("metrics-only"),
        "ratio_metrics_only": ratio("metrics-only"),
        "drift_us_per_request": cost("instrumented+drift", "instrumented"),
        "per_request_us_by_round": per_request_us,
        **figures,
        **(
            {
                "before": {
                    "cost_us_per_request": cost("instrumented@before", "uninstrumented@before"),
                    "ratio_instrumented": ratio("instrumented@before", "uninstrumented@before"),
                    # This server's instrumented app against the other's, request for request.
                    "instrumented_minus_before_us": cost("instrumented", "instrumented@before"),
                    "ratio_instrumented_to_before": ratio("instrumented", "instrumented@before"),
                }
            }
            if before
            else {}
        ),
    }


def tiny_model_request_ms(requests: int) -> float:
    """The median wall time of POST /generate (8 tokens) to the project's tiny model, in process
    through the instrumented app: what a request the monitoring is a share of costs. In a process of
    its own (torch stays out of this one and the workers)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_tiny_worker, args=(requests, child), name="bench-tiny-model", daemon=True)
    process.start()
    try:
        reply = parent.recv()
    finally:
        process.join(timeout=60)
    if isinstance(reply, str):
        raise SystemExit(reply)
    return float(reply)


def _tiny_worker(requests: int, conn: Connection) -> None:
    from slm_devtools.tinymodel import ensure_tiny_model
    from slm_server.generation.transformers_engine import TransformersEngine

    with open(os.devnull, "wb") as sink:
        handler = configure_logging(_settings(), stream=sink)
        try:
            settings = Settings(model=str(ensure_tiny_model()), served_model_name="echo")
            engine = TransformersEngine(settings)
            engine.load()
            app = create_app(settings, engine=engine, registry=CollectorRegistry())
            conn.send(asyncio.run(_tiny_requests(app, requests)))
        except Exception as exc:  # the parent reports it
            conn.send(f"tiny model: {type(exc).__name__}: {exc}")
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


async def _tiny_requests(app: Any, requests: int) -> float | str:
    body = TINY_BODY.encode()
    async with _lifespans([app]):
        for _ in range(5):  # warm-up
            await call(app, body=body)
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            status, text = await call(app, body=body)
            times.append((time.perf_counter() - start) * 1000)
            if status != 200 or json.loads(text)["output_tokens"] != 8:
                return f"tiny model: {status} {text[:200]!r}"
    return statistics.median(times)


class _lifespans:
    """Runs the apps' lifespans (start-up: model 'load', executor; shutdown: drain) around the run."""

    def __init__(self, apps: list[Any]):
        self._contexts = [app.router.lifespan_context(app) for app in apps]

    async def __aenter__(self) -> None:
        for ctx in self._contexts:
            await ctx.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        for ctx in reversed(self._contexts):
            await ctx.__aexit__(None, None, None)


# --- the same variants over HTTP: uvicorn processes on loopback, the server's own CPU per request -------------------
HTTP_VARIANTS = ("uninstrumented", "instrumented", "instrumentator")


def serve(name: str, port: int) -> None:
    """`--serve NAME --port P`: one variant under uvicorn on 127.0.0.1, logging as `slm-server` does
    (JSON lines, here into /dev/null)."""
    import uvicorn

    with open(os.devnull, "wb") as sink:
        configure_logging(_settings(), stream=sink)
        app, _ = build_variant(name)
        # The driver keeps one connection per server and leaves it idle while it drives the others:
        # longer than uvicorn's default keep-alive (5 s) on a busy machine.
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=600,
        )


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_http(requests: int, rounds: int, processes: int = 4) -> dict[str, Any]:
    """Each variant in `processes` uvicorn processes; blocks of `requests` keep-alive POST
    /generate from this process, interleaved across all the servers. A server's CPU is read from
    /proc before the first block and after the last, so the time between blocks (the log
    flusher's batches included) is counted too."""
    import http.client
    import socket
    import subprocess

    servers: dict[tuple[str, int], tuple[subprocess.Popen, int]] = {}
    try:
        for name in HTTP_VARIANTS:
            for index in range(processes):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                process = subprocess.Popen(  # this very script, with fixed arguments
                    [sys.executable, __file__, "--serve", name, "--port", str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                servers[name, index] = (process, port)
        connections = {}
        for key, (process, port) in servers.items():
            deadline = time.monotonic() + 120
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    conn.request("GET", "/readyz")
                    if conn.getresponse().read() and conn.sock is not None:
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the {key[0]} server did not start") from None
                    time.sleep(0.1)
            connections[key] = conn

        def block(key: tuple[str, int], count: int) -> None:
            conn = connections[key]
            for _ in range(count):
                conn.request("POST", "/generate", BODY, {"content-type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise SystemExit(f"{key[0]}: HTTP {response.status}")

        for key in servers:  # warm-up
            block(key, 300)
        time.sleep(0.3)  # the warm-up's last log batch (0.1 s interval) lands before the start
        first = {key: _cpu_seconds(process.pid) for key, (process, _) in servers.items()}
        order = list(servers)
        shuffle = random.Random(4)
        for _ in range(rounds):
            shuffle.shuffle(order)
            for key in order:
                block(key, requests)
        time.sleep(0.3)  # the flushers' last batch lands in the totals
        cpu = {name: 0.0 for name in HTTP_VARIANTS}
        for key, (process, _) in servers.items():
            cpu[key[0]] += _cpu_seconds(process.pid) - first[key]
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            process.wait(timeout=30)
    us = {name: seconds / (requests * rounds * processes) * 1e6 for name, seconds in cpu.items()}
    return {
        "us_per_request": {name: round(value, 1) for name, value in us.items()},
        "ratio_instrumented": us["uninstrumented"] / us["instrumented"],
        "ratio_instrumentator": us["uninstrumented"] / us["instrumentator"],
        "cost_us_per_request": us["instrumented"] - us["uninstrumented"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per block")
    parser.add_argument("--rounds", type=int, default=20, help="blocks per worker (interleaved)")
    parser.add_argument("--processes", type=int, default=4, help="worker processes per variant")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--http-rounds", type=int, default=4, help="blocks per server over HTTP (0: skip)")
    parser.add_argument("--tiny-requests", type=int, default=50, help="requests to the tiny model (0: skip)")
    parser.add_argument(
        "--before",
        type=Path,
        help="the root of another checkout (e.g. `git archive main | tar -x -C DIR`): its server's uninstrumented "
        "and instrumented apps run in the same rounds, and the difference is reported",
    )
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0

    result = run(args.requests, args.rounds, args.processes, args.before)
    if args.tiny_requests:
        result["tiny_model_request_ms"] = tiny_model_request_ms(args.tiny_requests)
        result["share_of_tiny_request"] = result["cost_us_per_request"] / (result["tiny_model_request_ms"] * 1000)
        if "before" in result:
            b = result["before"]
            b["difference_share_of_tiny_request"] = b["instrumented_minus_before_us"] / (
                result["tiny_model_request_ms"] * 1000
            )
    if args.http_rounds:
        result["http"] = run_http(args.requests, args.http_rounds, args.processes)

    r = result
    ok = {
        "ratio": r["ratio_instrumented"] > r["ratio_instrumentator"],
        "cost": r.get("share_of_tiny_request", 0.0) <= GOALS["share_of_tiny_request"],
        "metrics": r["metrics_render_ms"] <= GOALS["metrics_ms"],
    }
    print(f"server monitoring overhead — POST /generate on the no-op engine, in-process ASGI, "
          f"{r['processes_per_variant']} processes per variant, {r['rounds']} interleaved blocks of "
          f"{r['requests_per_block']} requests per process, "
          "CPU time per request")  # fmt: skip
    for name, value in r["rps"].items():
        print(f"  {name:<19} {value:>8.0f} req/s  ({r['us_per_request'][name]:.1f} µs/request)")
    print(f"  instrumented / uninstrumented    {r['ratio_instrumented']:.3f}   "
          f"(goal: above the instrumentator) {'ok' if ok['ratio'] else 'MISSED'}")  # fmt: skip
    print(f"  instrumentator / uninstrumented  {r['ratio_instrumentator']:.3f}")
    if "tiny_model_request_ms" in r:
        print(f"  metrics + logging per request    {r['cost_us_per_request']:.1f} µs   = "
              f"{r['share_of_tiny_request']:.2%} of a tiny-model request ({r['tiny_model_request_ms']:.1f} ms, "
              f"8 tokens; goal <= {GOALS['share_of_tiny_request']:.0%}) "
              f"{'ok' if ok['cost'] else 'MISSED'}")  # fmt: skip
    else:
        print(f"  metrics + logging per request    {r['cost_us_per_request']:.1f} µs")
    print(f"  of which metrics alone           {r['metrics_only_us_per_request']:.1f} µs   "
          f"(metrics-only / uninstrumented {r['ratio_metrics_only']:.3f}); "
          "the rest is the JSON request line")  # fmt: skip
    print(f"  drift detector per request       {r['drift_us_per_request']:.1f} µs   "
          f"(instrumented+drift / uninstrumented {r['ratio_instrumented_drift']:.3f})")  # fmt: skip
    print(f"  /metrics render                  {r['metrics_render_ms']:.2f} ms for {r['metrics_series']} series, "
          f"{r['metrics_bytes']} bytes (goal <= {GOALS['metrics_ms']:.0f} ms) {'ok' if ok['metrics'] else 'MISSED'}; "
          f"through the route {r['metrics_route_ms']:.2f} ms")  # fmt: skip
    if "before" in r:
        b = r["before"]
        share = b.get("difference_share_of_tiny_request")
        print(f"  before ({args.before}): metrics + logging {b['cost_us_per_request']:.1f} µs/request "
              f"(instrumented / uninstrumented {b['ratio_instrumented']:.3f}); this instrumented app against "
              f"the before's: {b['instrumented_minus_before_us']:+.1f} µs/request (ratio "
              f"{b['ratio_instrumented_to_before']:.3f})"
              + (f" = {share:+.2%} of a tiny-model request" if share is not None else ""))  # fmt: skip
    print(f"  full garbage collection          {r['full_gc_ms']:.2f} ms with the start-up objects frozen "
          f"({r['full_gc_unfrozen_ms']:.1f} ms without, in this process with no model)")  # fmt: skip
    if "http" in result:
        h = result["http"]
        print(f"over HTTP — uvicorn on 127.0.0.1, {args.processes} processes per variant, {args.http_rounds} "
              f"interleaved blocks of {args.requests} keep-alive requests per process, the servers' CPU per "
              "request (/proc)")  # fmt: skip
        for name, value in h["us_per_request"].items():
            print(f"  {name:<19} {1e6 / value:>8.0f} req/s  ({value:.1f} µs/request)")
        print(f"  instrumented / uninstrumented    {h['ratio_instrumented']:.3f}   "
              f"(instrumentator {h['ratio_instrumentator']:.3f}); "
              f"metrics + logging {h['cost_us_per_request']:.1f} µs/request")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
