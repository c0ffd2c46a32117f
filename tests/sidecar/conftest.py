"""Fixtures of the sidecar tests: the real built-in server with the project's tiny model as the runtime
(uvicorn in a thread of this process, its own request lines off so that the lines a test reads are the
sidecar's), the real `llama-server` (built by `make deps`) with the tiny model as GGUF, started with the
arguments the operator renders (`llama`), and the sidecar in front of either, served by uvicorn as
`slm-sidecar` serves it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from slm_server.drift import DriftSettings
from slm_server.settings import Settings
from slm_sidecar.app import Sidecar, create_app
from slm_sidecar.settings import SidecarSettings
from tests.server.conftest import MODEL_NAME, OUTPUT_HASH_KEY, json_records, live_server, tiny_model_dir

__all__ = ["json_records", "tiny_model_dir"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], seconds: float = 30.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy (returned); fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"{what} not met within {seconds} s"
        time.sleep(0.01)
    return result


class Runtime:
    """A runtime the sidecar fronts: the built-in server (its registry, in this process) or llama-server."""

    def __init__(self, url: str, registry: CollectorRegistry | None, name: str = "builtin", health: str = "/readyz"):
        self.url = url
        self.registry = registry
        self.name = name  # the sidecar's SLM_RUNTIME for it
        self.health = health  # its readiness endpoint (SLM_UPSTREAM_HEALTH_PATH)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        assert self.registry is not None, f"{self.name}'s metrics are not in this process"
        return self.registry.get_sample_value(name, labels or {}) or 0.0


class RunningSidecar:
    def __init__(self, app: Sidecar, url: str):
        self.app = app
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=60)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        registry = self.app.registry
        assert registry is not None
        return registry.get_sample_value(name, labels or {}) or 0.0

    def labels(self, **extra: str) -> dict[str, str]:
        return {"model": MODEL_NAME, **extra}


@contextlib.contextmanager
def runtime_server(engine: Any, model_dir: Path, **overrides: Any) -> Iterator[Runtime]:
    settings = Settings(
        model=str(model_dir), served_model_name=MODEL_NAME, log_requests=False, output_hash_key=OUTPUT_HASH_KEY,
        **overrides,
    )  # fmt: skip
    with live_server(engine, settings) as server:
        yield Runtime(str(server.client.base_url).rstrip("/"), server.registry)


@contextlib.contextmanager
def sidecar_server(
    upstream: str,
    drift: DriftSettings | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    **overrides: Any,
) -> Iterator[RunningSidecar]:
    """The sidecar in front of `upstream`, served by uvicorn in a thread as `slm-sidecar` serves it."""
    import uvicorn

    from slm_sidecar.cli import sidecar_config

    port = free_port()
    settings = SidecarSettings(
        **{
            "host": "127.0.0.1",
            "port": port,
            "upstream_url": upstream,
            "upstream_health_path": "/readyz",
            "runtime": "builtin",
            "served_model_name": MODEL_NAME,
            "output_hash_key": OUTPUT_HASH_KEY,
            "log_flush_interval_seconds": 0.05,
            **overrides,
        }
    )
    app = create_app(settings, registry=CollectorRegistry(), drift=drift, transport=transport)
    server = uvicorn.Server(sidecar_config(app, settings))
    thread = threading.Thread(target=server.run, name="sidecar", daemon=True)
    thread.start()
    running = RunningSidecar(app, f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 60, "uvicorn start")
        assert server.started, "the sidecar did not start"
        yield running
    finally:
        running.client.close()
        server.should_exit = True
        thread.join(timeout=60)


@contextlib.contextmanager
def fake_runtime(app: Any) -> Iterator[str]:
    """A stand-in runtime over real HTTP (an ASGI callable under uvicorn in a thread): its base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-runtime", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 60, "fake runtime start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def json_runtime(handler: Callable[[dict[str, Any]], tuple[int, Any]]) -> Any:
    """An ASGI runtime answering every POST with `handler(request body)`: (status, JSON)."""
    import json

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, doc = handler(json.loads(body) if body else {})
        data = json.dumps(doc).encode()
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": data})

    return app


@pytest.fixture(scope="session")
def runtime_engine(tiny_model_dir: Path) -> Iterator[Any]:
    """The tiny model without the prefix cache: a repeated request reports `cached_tokens` 0, as the
    first one did, so two replies to one request compare equal."""
    from slm_server.generation.transformers_engine import TransformersEngine

    engine = TransformersEngine(Settings(model=str(tiny_model_dir), served_model_name=MODEL_NAME, prefix_cache_mib=0))
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def runtime(runtime_engine: Any, tiny_model_dir: Path) -> Iterator[Runtime]:
    with runtime_server(runtime_engine, tiny_model_dir) as server:
        yield server


@pytest.fixture
def sidecar(runtime: Runtime) -> Iterator[RunningSidecar]:
    with sidecar_server(runtime.url) as running:
        wait_for(lambda: running.client.get("/readyz").status_code == 200, 30, "sidecar ready")
        yield running


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """The real llama-server serving the tiny model (GGUF) as MODEL_NAME, with the operator's arguments."""
    from slm_devtools.gguf import ensure_tiny_gguf
    from slm_devtools.runtimeplane import RuntimeServer
    from slm_operator.runtimes import render_runtime

    container = render_runtime("llamacpp", model=str(ensure_tiny_gguf(log=lambda *_: None)),
                               served_model_name=MODEL_NAME, port=free_port(), max_context=512, gpus=0,
                               host="127.0.0.1", extra_args=["--threads", "1"])  # fmt: skip
    server = RuntimeServer(container, tmp_path_factory.mktemp("llama") / "llama-server.log").start()
    try:
        yield Runtime(server.url, None, "llamacpp", container["probes"]["readiness"]["httpGet"]["path"])
    finally:
        server.stop()


@contextlib.contextmanager
def sidecar_for(runtime: Runtime, **overrides: Any) -> Iterator[RunningSidecar]:
    """The sidecar in front of `runtime`, told which runtime it is, once it says it is ready."""
    settings = {"runtime": runtime.name, "upstream_health_path": runtime.health, **overrides}
    with sidecar_server(runtime.url, **settings) as running:
        wait_for(lambda: running.client.get("/readyz").status_code == 200, 30, "sidecar ready")
        yield running
