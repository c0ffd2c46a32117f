"""What the monitoring sidecar costs: the same requests sent to a runtime directly and through the sidecar in
front of it, interleaved in one run, on loopback.

    .venv/bin/python bench/bench_sidecar.py [--requests 384] [--streams 64] [--tokens 32] [--rounds 3] [--no-pin]
                                            [--only echo,tiny,llama] [--json OUT]

Runtimes, each its own process, as in a pod (`slm-server`, `slm-sidecar`, `llama-server`):

  echo       the built-in server with its no-op engine (`SLM_ENGINE=echo`): replies in ~1 ms, so the
             sidecar's own time per request is not hidden by a model's. Unstreamed requests at 1 and at
             64 concurrent clients: p50 and p99 latency direct and through the sidecar, the difference
             (goal: p50 added <= 0.5 ms), and the throughput ratio at 64 (goal: >= 0.95 of direct).
  tiny       the built-in server with the project's tiny model: streams of `--tokens` tokens at 1 and
             `--streams` concurrent streams; inter-token latency as the client sees it (the gaps between
             the chunks of a stream), p50 and mean, through the sidecar over direct (goal: within 2 %).
  llama      the real `llama-server` (built by `make deps` once the runtimes work is in) with the tiny model
             as GGUF, the same streams; left out, and said so, when it is not built.

Streams are also sent directly with the log-probabilities the sidecar asks for on the client's behalf
(`direct_logprobs`): the runtime's own cost of computing and sending them (large for the tiny model, whose
tokens cost about what a softmax over its vocabulary costs) is then told apart from the sidecar's
(`itl_mean_ratio_vs_logprobs`).

Placement: unless `--no-pin`, each process is pinned to its own cores, as in a pod with the runtime's work
apart from the sidecar's: the runtime to the first CPU, the sidecar to the second, the load generator (this
process) to the rest, or with the sidecar where there are only two. The direct blocks keep the same
placement (the sidecar's core then idles).

Blocks of each kind alternate direct / sidecar for `--rounds` rounds; figures are over all the blocks of a
kind. The sidecar's CPU time per request (user + system of its process, from /proc, over every request it
served) and its resident memory at the end (VmRSS, and the peak VmHWM; goal <= 100 MiB) are reported too.
The machine's other load moves every figure: on the project's shared 2-core VM the client, the runtime and
the sidecar compete for the same two cores, so the added latency includes the sidecar's CPU time taken from
the runtime (as it would be in a pod with a CPU limit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("sidecar", "server", "devtools", "."))
sys.path[:0] = PYTHONPATH.split(os.pathsep)
PROMPT = " ".join(f"word{i}" for i in range(16))  # the echo engine answers the prompt's words
MODEL = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPUS = sorted(os.sched_getaffinity(0))


def placement(pin: bool) -> dict[str, set[int] | None]:
    """Cores of the runtime, the sidecar and the load generator (None: wherever the kernel puts them)."""
    if not pin or len(CPUS) < 2:
        return {"runtime": None, "sidecar": None, "client": None}
    return {"runtime": {CPUS[0]}, "sidecar": {CPUS[1]}, "client": set(CPUS[2:]) or {CPUS[1]}}


PLACE: dict[str, set[int] | None] = placement(False)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


@contextlib.contextmanager
def process(
    command: list[str], env: dict[str, str], ready: str, log: Path, cpus: set[int] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    with log.open("wb") as out:
        proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": PYTHONPATH, **env}, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=pin)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited:\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} not ready:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready, timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def builtin(engine: str, port: int, log: Path, model_dir: str = "") -> contextlib.AbstractContextManager[Any]:
    env = {
        "SLM_ENGINE": engine, "SLM_MODEL": model_dir, "SLM_SERVED_MODEL_NAME": MODEL, "SLM_HOST": "127.0.0.1",
        "SLM_PORT": str(port), "SLM_MAX_CONCURRENT_REQUESTS": "64", "SLM_MAX_QUEUED_REQUESTS": "256",
        "SLM_LOG_REQUESTS": "false", "SLM_GPU_METRICS": "false", "SLM_DRIFT_ENABLED": "false",
    }  # fmt: skip
    return process([sys.executable, "-m", "slm_server"], env, f"http://127.0.0.1:{port}/readyz", log, PLACE["runtime"])


def sidecar(
    upstream: str, health: str, runtime: str, port: int, log: Path, **extra: str
) -> contextlib.AbstractContextManager[Any]:
    env = {
        "SLM_UPSTREAM_URL": upstream, "SLM_UPSTREAM_HEALTH_PATH": health, "SLM_RUNTIME": runtime,
        "SLM_SERVED_MODEL_NAME": MODEL, "SLM_HOST": "127.0.0.1", "SLM_PORT": str(port), "SLM_GPU_METRICS": "false",
        **extra,
    }  # fmt: skip
    with log.open("w"):
        pass
    # Its JSON lines go to /dev/null: the writing is measured, the disk is not.
    return process(
        [sys.executable, "-m", "slm_sidecar"],
        env,
        f"http://127.0.0.1:{port}/readyz",
        Path(os.devnull),
        PLACE["sidecar"],
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _client(base: str) -> Any:
    """The load generator's connections: the sidecar's own HTTP/1.1 client (one write per request, responses
    parsed in C), so that the client's CPU, on the same cores, weighs as little as can be."""
    from slm_sidecar.upstream import Upstream

    host, port = base.removeprefix("http://").split(":")
    return Upstream(host, int(port), connect_timeout=5)


_HEADERS = [(b"content-type", b"application/json")]


async def unstreamed(base: str, requests: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies (s) of `requests` POST /v1/completions by `concurrency` clients, and the wall time."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 8}).encode()
    latencies: list[float] = []
    client = _client(base)

    async def one() -> None:
        reply = await client.request(b"POST", b"/v1/completions", _HEADERS, body)
        await reply.read()
        await reply.aclose()
        assert reply.status == 200

    await asyncio.gather(*(one() for _ in range(concurrency)))  # the connections, warm

    async def one_client(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one_client(requests // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    client.close()
    return latencies, elapsed


async def streams(
    base: str, count: int, concurrency: int, tokens: int, extra: dict[str, Any] | None = None
) -> tuple[list[float], list[float]]:
    """Inter-chunk gaps (s) of `count` streamed completions of `tokens` tokens, `concurrency` at a time, and
    their times to the first chunk."""
    body = {"model": MODEL, "prompt": "The module provides", "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, **(extra or {})}  # fmt: skip
    data = json.dumps(body).encode()
    gaps: list[float] = []
    firsts: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    client = _client(base)

    async def one() -> None:
        async with gate:
            started = time.perf_counter()
            times = []
            reply = await client.request(b"POST", b"/v1/completions", _HEADERS, data)
            assert reply.status == 200
            async for piece in reply.pieces():
                now = time.perf_counter()
                times.extend([now] * piece.count(b"data: {"))
            await reply.aclose()
            firsts.append(times[0] - started)
            gaps.extend(b - a for a, b in itertools.pairwise(times))

    await asyncio.gather(*(one() for _ in range(count)))
    client.close()
    return gaps, firsts


def ms(value: float) -> float:
    return round(value * 1000, 3)


def measure_unstreamed(direct: str, through: str, requests: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for concurrency in (1, 64):
        lat: dict[str, list[float]] = {"direct": [], "sidecar": []}
        wall: dict[str, float] = {"direct": 0.0, "sidecar": 0.0}
        for _ in range(rounds):
            for name, base in (("direct", direct), ("sidecar", through)):
                values, seconds = asyncio.run(unstreamed(base, requests, concurrency))
                lat[name] += values
                wall[name] += seconds
        p50 = {k: percentile(v, 0.5) for k, v in lat.items()}
        p99 = {k: percentile(v, 0.99) for k, v in lat.items()}
        out[f"c{concurrency}"] = {
            "requests": len(lat["direct"]),
            "p50_ms": {k: ms(v) for k, v in p50.items()},
            "p99_ms": {k: ms(v) for k, v in p99.items()},
            "p50_added_ms": ms(p50["sidecar"] - p50["direct"]),
            "p99_added_ms": ms(p99["sidecar"] - p99["direct"]),
            "throughput_rps": {k: round(len(lat[k]) / wall[k], 1) for k in wall},
            "throughput_ratio": round(wall["direct"] / wall["sidecar"], 3),
        }
    return out


def measure_streams(direct: str, through: str, streams_at_once: int, tokens: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for concurrency in (1, streams_at_once):
        count = 4 if concurrency == 1 else concurrency
        gaps: dict[str, list[float]] = {"direct": [], "direct_logprobs": [], "sidecar": []}
        firsts: dict[str, list[float]] = {"direct": [], "direct_logprobs": [], "sidecar": []}
        blocks = (("direct", direct, None), ("direct_logprobs", direct, {"logprobs": 1}), ("sidecar", through, None))
        for _ in range(rounds):
            for name, base, extra in blocks:
                g, f = asyncio.run(streams(base, count, concurrency, tokens, extra))
                gaps[name] += g
                firsts[name] += f
        itl_p50 = {k: percentile(v, 0.5) for k, v in gaps.items()}
        itl_mean = {k: statistics.fmean(v) for k, v in gaps.items()}
        out[f"c{concurrency}"] = {
            "streams": count * rounds,
            "itl_p50_ms": {k: ms(v) for k, v in itl_p50.items()},
            "itl_mean_ms": {k: ms(v) for k, v in itl_mean.items()},
            "itl_mean_ratio": round(itl_mean["sidecar"] / itl_mean["direct"], 4),
            "itl_mean_ratio_vs_logprobs": round(itl_mean["sidecar"] / itl_mean["direct_logprobs"], 4),
            "itl_mean_added_ms": ms(itl_mean["sidecar"] - itl_mean["direct"]),
            "ttft_p50_ms": {k: ms(percentile(v, 0.5)) for k, v in firsts.items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    global PLACE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=384, help="unstreamed requests per block")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams (the second level)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    parser.add_argument("--rounds", type=int, default=3, help="direct/sidecar block pairs per measurement")
    parser.add_argument("--no-pin", action="store_true", help="leave every process wherever the kernel puts it")
    parser.add_argument("--only", default="echo,tiny,llama", help="which runtimes (comma-separated)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    import tempfile

    PLACE = placement(not args.no_pin)
    work = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    figures: dict[str, Any] = {
        "command": " ".join(["bench/bench_sidecar.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpus": {k: sorted(v) if v else "any" for k, v in PLACE.items()},
    }
    if PLACE["client"]:
        os.sched_setaffinity(0, PLACE["client"])

    if "echo" in only:
        figures.update(measure_echo(args, work))
    if "tiny" in only:
        from slm_devtools.tinymodel import ensure_tiny_model

        model_dir = str(ensure_tiny_model(log=lambda *_: None))
        port, front = free_port(), free_port()
        with builtin("transformers", port, work / "tiny.log", model_dir):
            upstream = f"http://127.0.0.1:{port}"
            with sidecar(upstream, "/readyz", "builtin", front, work / "sidecar-tiny.log") as proc:
                figures["tiny"] = measure_streams(
                    upstream, f"http://127.0.0.1:{front}", args.streams, args.tokens, args.rounds
                )
                figures["sidecar_memory_mib_after_streams"] = {k: round(v, 1) for k, v in memory_mib(proc.pid).items()}
    if "llama" in only:
        figures["llama"] = measure_llama(args, work)
    print(json.dumps(figures, indent=2))
    if "echo" in figures:
        echo = figures["echo"]
        print(
            f"\nadded p50 latency: {echo['c1']['p50_added_ms']} ms at 1 client, {echo['c64']['p50_added_ms']} ms at "
            f"64 (goal <= 0.5); throughput ratio at 64: {echo['c64']['throughput_ratio']} (goal >= 0.95)"
        )
        print(
            f"sidecar CPU per request: {figures['sidecar_cpu_us_per_request']} µs (the echo runtime's own: "
            f"{figures['echo_runtime_cpu_us_per_request']} µs); RSS {figures['sidecar_memory_mib']['VmRSS']} MiB, "
            f"peak {figures['sidecar_memory_mib']['VmHWM']} MiB (goal <= 100)"
        )
    for name in ("tiny", "llama"):
        if isinstance(figures.get(name), dict):
            ratios = ", ".join(
                f"{k}: {v['itl_mean_ratio']} (+{v['itl_mean_added_ms']} ms; against direct with the same "
                f"log-probabilities {v['itl_mean_ratio_vs_logprobs']})"
                for k, v in figures[name].items()
            )
            print(f"{name}: streamed inter-token latency through / direct: {ratios} (goal <= 1.02)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def measure_echo(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Unstreamed requests on the echo runtime; the sidecar's CPU per request and its memory."""
    figures: dict[str, Any] = {}
    port, front = free_port(), free_port()
    with builtin("echo", port, work / "echo.log") as runtime_proc:
        upstream = f"http://127.0.0.1:{port}"
        with sidecar(upstream, "/readyz", "builtin", front, work / "sidecar-echo.log") as proc:
            before, runtime_before = cpu_seconds(proc.pid), cpu_seconds(runtime_proc.pid)
            figures["echo"] = measure_unstreamed(upstream, f"http://127.0.0.1:{front}", args.requests, args.rounds)
            # Every block starts with one request per client to warm the connections: 1 + 64 a round.
            through = sum(v["requests"] for v in figures["echo"].values()) + 65 * args.rounds
            figures["sidecar_cpu_us_per_request"] = round((cpu_seconds(proc.pid) - before) / through * 1e6, 1)
            # For scale: the echo runtime's own CPU per request (every request reached it, direct or not).
            runtime_cpu = cpu_seconds(runtime_proc.pid) - runtime_before
            figures["echo_runtime_cpu_us_per_request"] = round(runtime_cpu / (2 * through) * 1e6, 1)
            figures["sidecar_memory_mib"] = {k: round(v, 1) for k, v in memory_mib(proc.pid).items()}
    return figures


def measure_llama(args: argparse.Namespace, work: Path) -> dict[str, Any] | str:
    """The same streams on the real llama-server, when `make deps` built it."""
    try:
        from slm_devtools.tools import ToolMissing, tool

        binary = tool("llama-server")
        from slm_devtools.gguf import ensure_tiny_gguf  # type: ignore[import-not-found]
    except (ImportError, ToolMissing) as exc:
        message = f"skipped: llama-server is not built here ({type(exc).__name__}: {exc})"
        print(message, file=sys.stderr)
        return message
    gguf = ensure_tiny_gguf(log=lambda *_: None)
    port, front = free_port(), free_port()
    command = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", MODEL,
               "--ctx-size", "4096", "--parallel", str(args.streams), "--metrics", "--threads", "1"]  # fmt: skip
    with (
        process(command, {}, f"http://127.0.0.1:{port}/health", work / "llama.log", PLACE["runtime"]),
        sidecar(f"http://127.0.0.1:{port}", "/health", "llamacpp", front, work / "sidecar-llama.log"),
    ):
        return measure_streams(
            f"http://127.0.0.1:{port}", f"http://127.0.0.1:{front}", args.streams, args.tokens, args.rounds
        )


if __name__ == "__main__":
    raise SystemExit(main())
