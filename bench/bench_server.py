"""Server monitoring overhead benchmark (issue 4's figures).

    .venv/bin/python bench/bench_server.py [--requests 2000] [--rounds 7] [--json OUT]

Three variants of the same app, all on the no-op `EchoEngine` (so no model time hides the overhead),
measured in one run, in one process, interleaved round by round so machine noise hits all alike:

  uninstrumented   create_app(metrics_enabled=False): no middleware, no metrics, no request logs
  instrumented     the default server: monitoring middleware, every slm_* metric, one JSON log line
                   per request (written to /dev/null: formatting and the write are paid), output
                   hashing, drift signals
  instrumentator   the uninstrumented app + prometheus-fastapi-instrumentator's defaults

Each request is POST /generate driven straight through the ASGI interface (no sockets, no HTTP
client: their cost would dilute the difference being measured). Reported: requests/s per variant
(median of the rounds), the ratios to the uninstrumented app (goal: instrumented >= 0.90 and above
the instrumentator), the monitoring cost per request in µs (goal <= 25 µs), and the /metrics render
time and size at the server's default series count (goal <= 20 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.exposition import generate_latest  # noqa: E402

from slm_server.app import create_app  # noqa: E402
from slm_server.engine import EchoEngine  # noqa: E402
from slm_server.logs import configure_logging  # noqa: E402
from slm_server.settings import Settings  # noqa: E402

BODY = json.dumps({"prompt": "one two three four five six seven eight", "max_tokens": 8}).encode()
GOALS = {"ratio": 0.90, "cost_us": 25.0, "metrics_ms": 20.0}


def _settings(**overrides: Any) -> Settings:
    return Settings(model="echo", served_model_name="echo", engine="echo", **overrides)


def _engine(settings: Settings) -> EchoEngine:
    engine = EchoEngine(settings)
    engine.load()
    return engine


def build_variants() -> dict[str, tuple[Any, CollectorRegistry | None]]:
    variants: dict[str, tuple[Any, CollectorRegistry | None]] = {}
    s = _settings(metrics_enabled=False)
    variants["uninstrumented"] = (create_app(s, engine=_engine(s)), None)
    s = _settings()
    registry = CollectorRegistry()
    variants["instrumented"] = (create_app(s, engine=_engine(s), registry=registry), registry)
    from prometheus_fastapi_instrumentator import Instrumentator

    s = _settings(metrics_enabled=False)
    app = create_app(s, engine=_engine(s))
    inst_registry = CollectorRegistry()
    Instrumentator(registry=inst_registry).instrument(app).expose(app)
    variants["instrumentator"] = (app, inst_registry)
    return variants


def _scope(path: str, method: str = "POST") -> dict[str, Any]:
    headers = [(b"host", b"bench"), (b"content-type", b"application/json")]
    if method == "POST":
        headers.append((b"content-length", str(len(BODY)).encode()))
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


async def call(app: Any, path: str = "/generate", method: str = "POST") -> tuple[int, bytes]:
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY if method == "POST" else b"", "more_body": False}
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


async def run(requests: int, rounds: int) -> dict[str, Any]:
    variants = build_variants()
    rps: dict[str, list[float]] = {name: [] for name in variants}
    async with _lifespans([app for app, _ in variants.values()]):
        for name, (app, _) in variants.items():  # warm-up and sanity
            for _ in range(200):
                status, body = await call(app)
            assert status == 200, (name, status, body[:200])
        for _ in range(rounds):
            for name, (app, _) in variants.items():
                start = time.perf_counter()
                for _ in range(requests):
                    await call(app)
                rps[name].append(requests / (time.perf_counter() - start))
        registry = variants["instrumented"][1]
        assert registry is not None
        render_ms = []
        for _ in range(50):
            start = time.perf_counter()
            text = generate_latest(registry)
            render_ms.append((time.perf_counter() - start) * 1000)
        series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
        route_status, route_body = await call(variants["instrumented"][0], "/metrics", "GET")
        route_ms = []
        for _ in range(20):
            start = time.perf_counter()
            await call(variants["instrumented"][0], "/metrics", "GET")
            route_ms.append((time.perf_counter() - start) * 1000)
        assert route_status == 200
    median = {name: statistics.median(values) for name, values in rps.items()}
    base = median["uninstrumented"]
    per_round_cost = [
        (1 / i - 1 / u) * 1e6 for i, u in zip(rps["instrumented"], rps["uninstrumented"], strict=True)
    ]
    return {
        "requests_per_round": requests,
        "rounds": rounds,
        "rps": {name: round(value, 1) for name, value in median.items()},
        "ratio_instrumented": median["instrumented"] / base,
        "ratio_instrumentator": median["instrumentator"] / base,
        "cost_us_per_request": statistics.median(per_round_cost),
        "metrics_render_ms": statistics.median(render_ms),
        "metrics_route_ms": statistics.median(route_ms),
        "metrics_bytes": len(route_body),
        "metrics_series": series,
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    # The request logs really are formatted and written, to /dev/null.
    with open(os.devnull, "w") as sink:
        configure_logging(_settings(), stream=sink)
        logging.getLogger().setLevel(logging.INFO)
        result = asyncio.run(run(args.requests, args.rounds))
        logging.getLogger().handlers.clear()

    r = result
    ok = {
        "ratio": r["ratio_instrumented"] >= GOALS["ratio"] and r["ratio_instrumented"] > r["ratio_instrumentator"],
        "cost": r["cost_us_per_request"] <= GOALS["cost_us"],
        "metrics": r["metrics_render_ms"] <= GOALS["metrics_ms"],
    }
    print(f"server monitoring overhead — POST /generate on the no-op engine, {r['rounds']} rounds x "
          f"{r['requests_per_round']} requests per variant, in-process ASGI")  # fmt: skip
    for name, value in r["rps"].items():
        print(f"  {name:<15} {value:>10.0f} req/s")
    print(f"  instrumented / uninstrumented    {r['ratio_instrumented']:.3f}   (goal >= {GOALS['ratio']:.2f} "
          f"and above the instrumentator) {'ok' if ok['ratio'] else 'MISSED'}")  # fmt: skip
    print(f"  instrumentator / uninstrumented  {r['ratio_instrumentator']:.3f}")
    print(f"  monitoring cost per request      {r['cost_us_per_request']:.1f} µs   (metrics + JSON log line + "
          f"drift signals; goal <= {GOALS['cost_us']:.0f} µs) {'ok' if ok['cost'] else 'MISSED'}")  # fmt: skip
    print(f"  /metrics render                  {r['metrics_render_ms']:.2f} ms for {r['metrics_series']} series, "
          f"{r['metrics_bytes']} bytes (goal <= {GOALS['metrics_ms']:.0f} ms) {'ok' if ok['metrics'] else 'MISSED'}; "
          f"through the route {r['metrics_route_ms']:.2f} ms")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
