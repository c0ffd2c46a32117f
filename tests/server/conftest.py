"""Fixtures of the server tests.

The model is the project's real tiny model (built once per machine, ~1 minute, under a file lock;
see slm_devtools.tinymodel), loaded once per session. Every test that involves generation uses it;
the no-op `EchoEngine` appears only in tests about HTTP and metrics plumbing that no model output
can influence (readiness before load, the uninstrumented variant), and says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from slm_devtools.tinymodel import ensure_tiny_model
from slm_server.app import create_app
from slm_server.generation.transformers_engine import TransformersEngine
from slm_server.generation.types import GenerationResult, SamplingParams
from slm_server.logs import configure_logging
from slm_server.settings import Settings

MODEL_NAME = "tiny"
OUTPUT_HASH_KEY = "test-output-hash-key"  # the servers' SLM_OUTPUT_HASH_KEY, unless a test leaves it out
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> TransformersEngine:
    engine = TransformersEngine(Settings(model=str(tiny_model_dir), served_model_name=MODEL_NAME))
    engine.load()
    return engine


def settings_for(model_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        model=str(model_dir), served_model_name=MODEL_NAME, **{"output_hash_key": OUTPUT_HASH_KEY, **overrides}
    )


def one_slot_settings(model_dir: Path) -> Settings:
    """One generation at a time, no queue, each taking at least 1 s: the second request at once is refused."""
    return settings_for(
        model_dir, max_concurrent_requests=1, max_queued_requests=0, fault_injection=True, fault_latency_seconds=1.0
    )


class Server:
    """An app in process (TestClient, lifespan run), with its registry."""

    def __init__(self, client: TestClient, registry: CollectorRegistry, settings: Settings):
        self.client = client
        self.registry = registry
        self.settings = settings

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})


@contextlib.contextmanager
def serve(engine, settings: Settings, **kwargs: Any) -> Iterator[Server]:
    registry = CollectorRegistry()
    app = create_app(settings, engine=engine, registry=registry, **kwargs)
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.02)
        yield Server(client, registry, settings)


@pytest.fixture
def server(tiny_engine: TransformersEngine, tiny_model_dir: Path) -> Iterator[Server]:
    with serve(tiny_engine, settings_for(tiny_model_dir)) as srv:
        yield srv


def sse_events(client: TestClient, path: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], httpx.Headers]:
    """POST `body` with stream=true: the JSON of every server-sent event before `[DONE]`, and the
    response's headers."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(frame) for frame in frames[:-1]], r.headers


def wait_for(predicate: Any, seconds: float = 10.0) -> Any:
    """Poll `predicate` until it returns something truthy (returned), failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while not (result := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
    return result


@pytest.fixture
def json_records() -> Iterator[Any]:
    """The JSON lines the server writes during the test, read back as objects.

    The process's logging is set up as `slm-server` sets it up (slm_server.logs.configure_logging),
    into a buffer instead of stdout, so request lines take the same path as in production."""
    stream = io.BytesIO()
    handler = configure_logging(Settings(log_flush_interval_seconds=0.05), stream=stream)

    def read(event: str | None = None) -> list[dict[str, Any]]:
        handler.flush()
        docs = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
        return [d for d in docs if event is None or d.get("event") == event]

    yield read
    logging.getLogger().removeHandler(handler)
    handler.close()


@pytest.fixture
def own_engine(tiny_model_dir: Path) -> Any:
    """An engine of its own, for tests that break its model or change its settings."""
    engines: list[TransformersEngine] = []

    def make(**overrides: Any) -> TransformersEngine:
        engine = TransformersEngine(settings_for(tiny_model_dir, **overrides))
        engine.load()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def assert_same_generation(together: GenerationResult, alone: GenerationResult) -> None:
    """A generation run beside others (or in other passes) is the same generation as `alone`."""
    assert together.token_ids == alone.token_ids
    assert together.text == alone.text
    assert together.finish_reason == alone.finish_reason
    assert math.isclose(together.logprob_sum, alone.logprob_sum, rel_tol=1e-4, abs_tol=1e-4)
    if alone.token_logprobs is not None:
        assert together.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)
        ranked = [[[t for t, _ in top] for top in r.top_logprobs] for r in (together, alone)]  # type: ignore[union-attr]
        assert ranked[0] == ranked[1]


class HeldRun:
    """A long greedy generation on `engine` whose text callback (on the scheduler's thread, so
    nothing else runs meanwhile) holds the scheduler at `holds` pieces of text, each until the test
    releases it: from its second on, which come from decode steps (the first comes from its own
    prefill, and a decode step follows that in the same loop), so a release lets the loop go on to
    its next round, which takes what has arrived."""

    PROMPT = "Return a new list of the"  # greedy, the tiny model goes on to 200 tokens from it
    RUNNING = SamplingParams(max_tokens=200, temperature=0)

    def __init__(self, engine: TransformersEngine, holds: int = 1):
        self.engine = engine
        self.holds = [(threading.Event(), threading.Event()) for _ in range(holds)]  # (held, release)
        self.pieces = 0
        self.released_at = 0.0
        self.result: Any = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _on_text(self, text: str, _: Any) -> None:
        self.pieces += 1
        if 2 <= self.pieces < len(self.holds) + 2:
            held, release = self.holds[self.pieces - 2]
            held.set()
            release.wait(30)

    def _run(self) -> None:
        self.result = self.engine.generate(self.engine.encode(self.PROMPT), self.RUNNING, self._on_text)

    def wait_held(self, hold: int) -> None:
        assert self.holds[hold][0].wait(30), f"not held at piece {hold + 1}"

    def release(self, hold: int) -> None:
        self.released_at = time.perf_counter()
        self.holds[hold][1].set()

    def release_all(self) -> None:  # in a finally: a failed test must not leave the engine held
        for _, release in self.holds:
            release.set()

    def tokens_between(self, start: float, end: float) -> int:
        return sum(start < t < end for t in self.result.token_times)

    def arrive_together(self, prompts: list[str], params: SamplingParams) -> list[Any]:
        """While held at its first hold, start a generation of each prompt; once they all wait in
        the scheduler's inbox (so its next round prefills them together), release. Their results
        (or what they raised), once they and this run have ended."""
        try:
            self.wait_held(0)
            started = [start_generation(self.engine, prompt, params) for prompt in prompts]
            wait_for(lambda: self.engine.scheduler.waiting == len(prompts))
            self.release(0)
        finally:
            self.release_all()
        for thread, _ in started:
            thread.join(timeout=60)
        self.thread.join(timeout=60)
        return [out["result"] for _, out in started]


def start_generation(
    engine: TransformersEngine, prompt: str, params: SamplingParams, cancel: threading.Event | None = None
):
    """A generation in a thread of its own: the thread, and a dict whose "result" is the result or what it raised."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = engine.generate(engine.encode(prompt), params, None, cancel)
        except BaseException as exc:  # the test looks at it
            out["result"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def random_sampling(rng: random.Random, longest: int) -> SamplingParams:
    """Greedy or seeded sampling at even odds, 1 to `longest` tokens, log-probabilities on."""
    sampled = rng.random() < 0.5
    return SamplingParams(
        max_tokens=rng.randint(1, longest),
        temperature=0.9 if sampled else 0.0,
        seed=rng.randint(0, 1000) if sampled else None,
        logprobs=0,
    )


def assert_staggered_as_alone(
    engine: TransformersEngine, reference: TransformersEngine, jobs: list[tuple[str, SamplingParams, int]]
) -> None:
    """Run `jobs` on `engine` as `generate_staggered` does; each is the same generation as its
    prompt alone on `reference`."""
    alone = [reference.generate(reference.encode(prompt), params) for prompt, params, _ in jobs]
    results = generate_staggered(engine, jobs)
    for (prompt, _, start), result, expected in zip(jobs, results, alone, strict=True):
        assert isinstance(result, GenerationResult), (prompt, start, result)
        assert_same_generation(result, expected)


def generate_together(
    engine: TransformersEngine, jobs: list[tuple[str, SamplingParams]], on_text: Callable[[int], Any] | None = None
) -> list[Any]:
    """Run the generations from threads released at once; each one's result, or what it raised."""
    results: list[Any] = [RuntimeError("not run")] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        prompt, params = jobs[i]
        ids = engine.encode(prompt)
        start.wait(timeout=60)
        try:
            results[i] = engine.generate(ids, params, on_text(i) if on_text else None, None)
        except BaseException as exc:  # the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def generate_staggered(engine: TransformersEngine, jobs: list[tuple[str, SamplingParams, int]]) -> list[Any]:
    """Run the generations, each from its own thread once the engine has made `start` forward passes
    since the first job began (or once nothing runs: a start never waits for passes that will not
    come); each one's result, or what it raised. Generations so join a running batch at different
    steps, beside others of other lengths, and leave it at different steps."""
    results: list[Any] = [RuntimeError("not run")] * len(jobs)

    def stats() -> tuple[int, int, int]:
        now = engine.batch_stats()
        assert now is not None
        return now

    first_pass = stats()[1]

    def run(i: int) -> None:
        prompt, params, start = jobs[i]
        ids = engine.encode(prompt)
        try:
            if i > 0:
                wait_for(lambda: stats()[1] - first_pass >= start or stats()[0] == 0 or not first.is_alive(), 60)
            results[i] = engine.generate(ids, params)
        except BaseException as exc:  # the test looks at it
            results[i] = exc

    first = threading.Thread(target=run, args=(0,))
    first.start()
    wait_for(lambda: stats()[0] > 0 or not first.is_alive(), 60)  # the first one runs: passes are coming
    threads = [threading.Thread(target=run, args=(i,)) for i in range(1, len(jobs))]
    for t in threads:
        t.start()
    for t in [first, *threads]:
        t.join(timeout=120)
    return results


# --- a real server process -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(engine: Any, settings: Settings) -> Iterator[Server]:
    """The app served by uvicorn as `slm-server` configures it (slm_server.cli.uvicorn_config), on a free
    loopback port, in a thread of this process (the loaded engine is reused); `client` talks HTTP to it."""
    import uvicorn

    from slm_server.cli import uvicorn_config

    port = free_port()
    settings = Settings(**{**settings.model_dump(), "host": "127.0.0.1", "port": port})
    registry = CollectorRegistry()
    server = uvicorn.Server(uvicorn_config(create_app(settings, engine=engine, registry=registry), settings))
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 60)
        assert server.started, "uvicorn did not start"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, 60)
            yield Server(client, registry, settings)  # type: ignore[arg-type]
    finally:
        server.should_exit = True
        thread.join(timeout=60)


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, base_url: str, log_path: Path):
        self.proc = proc
        self.base_url = base_url
        self.log_path = log_path

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines() if line.strip()]


@contextlib.contextmanager
def server_process(model_dir: Path, tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """`python -m slm_server` on a free loopback port; stdout+stderr into a file; stopped with SIGTERM."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    full_env = {
        **os.environ,
        "SLM_MODEL": str(model_dir),
        "SLM_SERVED_MODEL_NAME": MODEL_NAME,
        "SLM_HOST": "127.0.0.1",
        "SLM_PORT": str(port),
        **(env or {}),
    }
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slm_server"], env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )
    base_url = f"http://127.0.0.1:{port}"
    handle = ServerProcess(proc, base_url, log_path)
    try:
        deadline = time.monotonic() + 180  # importing torch on a busy 2-core machine is slow
        while True:
            assert proc.poll() is None, f"server exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not ready:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield handle
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
