"""`create_app` — the one place the server is wired together. There is no module-level app.

app = create_app(Settings(model="/models/phi-3"))                 # production (via slm_server.cli)
app = create_app(settings, engine=loaded_engine, registry=CollectorRegistry())   # tests
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest

from slm_server import __version__
from slm_server.errors import install_error_handlers
from slm_server.generation.types import Engine
from slm_server.logs import flush_lines
from slm_server.metrics import (
    BatchCollector,
    FilesystemCollector,
    KVCacheCollector,
    NullMetrics,
    PrefixCacheCollector,
    ServerMetrics,
    gpu_collector,
)
from slm_server.middleware import RequestMiddleware
from slm_server.routers import completions, generate, health, tokens
from slm_server.service.serving import GenerationService
from slm_server.settings import Settings
from slm_server.signals import SignalObserver

log = logging.getLogger("slm_server")


def _event(
    message: str,
    event: str,
    fields: dict[str, Any] | None = None,
    level: int = logging.INFO,
    exc_info: BaseException | None = None,
) -> None:
    log.log(level, message, exc_info=exc_info, extra={"fields": {"event": event, **(fields or {})}})


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    registry: CollectorRegistry | None = None,
    signals: SignalObserver | None = None,
) -> FastAPI:
    """Build the server.

    settings: defaults to the environment (`SLM_*`).
    engine:   a ready engine to reuse (its `info` set = already loaded), else one made from settings
              and loaded in the background after start-up, /readyz answering 503 meanwhile.
    registry: where the metrics go; a fresh CollectorRegistry when None (never the global one).
    signals:  the drift-detection hook (slm_server.signals); by default slm_server.drift's detector
              (SLM_DRIFT_ENABLED, on unless set false) publishing into the slm_drift_* gauges.
    """
    settings = settings or Settings()  # type: ignore[call-arg]  # (fields come from the environment)
    owns_engine = engine is None  # an engine given by the caller outlives the app
    engine = engine or make_engine(settings)
    if settings.metrics_enabled:
        registry = registry if registry is not None else CollectorRegistry()
        metrics: ServerMetrics | NullMetrics = ServerMetrics(registry, settings.model_name)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        registry.register(FilesystemCollector(lambda: settings.disk_path_list or _model_dir(engine)))
        registry.register(BatchCollector(settings.model_name, engine.batch_stats))
        registry.register(KVCacheCollector(settings.model_name, engine.kv_cache_stats))
        registry.register(PrefixCacheCollector(settings.model_name, engine.prefix_cache_stats))
        if settings.gpu_metrics:
            gpus = gpu_collector()  # logs gpu_found or gpu_missing, once
            if gpus is not None:
                registry.register(gpus)
    else:
        metrics = NullMetrics(settings.model_name)
    if signals is None:
        signals = _default_observer(metrics)
    service = GenerationService(settings, engine, metrics, signals)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _event(
            "server starting",
            "startup",
            {
                "slm.version": __version__,
                "gen_ai.request.model": settings.model_name,
                "slm.model_source": settings.model,
                "slm.max_concurrent_requests": settings.max_concurrent_requests,
                "slm.max_queued_requests": settings.max_queued_requests,
                "slm.fault_injection": settings.fault_injection,
                "slm.log_outputs": settings.log_outputs,
            },
        )
        service.start()
        listener = None
        if settings.fault_admin_api:  # its own port, never this one (slm_server.admin)
            from slm_server.admin import AdminListener, admin_app

            listener = AdminListener(admin_app(service, settings), settings)
            await listener.start()
        if engine.loaded:
            await _load(service, metrics)  # a ready engine was given: ready at once
        loader = asyncio.create_task(_load(service, metrics))
        app.state.loader = loader
        try:
            yield
        finally:
            _event(
                "shutting down: draining in-flight requests",
                "shutdown",
                {"in_flight": service.admission.in_flight if service.admission else 0},
            )
            if not loader.done():
                loader.cancel()
            if listener is not None:
                await listener.stop()
            await service.stop()
            gc.unfreeze()  # what start-up froze is collectable again (a process that builds apps, like tests)
            if owns_engine:
                engine.close()
            _event("stopped", "shutdown")
            flush_lines()

    app = FastAPI(
        title="slm-server",
        version=__version__,
        description="A small-language-model inference server, instrumented for Prometheus and JSON logs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(completions.router)
    app.include_router(tokens.router)
    if isinstance(metrics, ServerMetrics):
        registry_ = metrics.registry

        @app.get("/metrics", include_in_schema=False)
        async def prometheus_metrics(request: Request) -> Response:
            return Response(generate_latest(registry_), media_type=CONTENT_TYPE_LATEST)

    # Request ids and the body cap are serving, not monitoring: the middleware is there with
    # metrics and request lines off too (the benchmark's uninstrumented baseline).
    app.add_middleware(RequestMiddleware, settings=settings, metrics=metrics)
    return app


def make_engine(settings: Settings) -> Engine:
    """The engine SLM_ENGINE names; the transformers engine's module (torch) is imported only for it."""
    if settings.engine == "echo":
        from slm_server.generation.echo_engine import EchoEngine

        return EchoEngine(settings)
    from slm_server.generation.transformers_engine import TransformersEngine

    return TransformersEngine(settings)


def _freeze_startup_objects() -> None:
    """Take what start-up made (the framework, torch, transformers, the model) out of the garbage
    collector's sight: ~470,000 tracked objects in a server with the tiny model, more with a real one.

    CPython runs a full collection once the objects that survived younger collections grow past a
    quarter of the long-lived ones, and a full collection walks every tracked object: 310 ms with
    the tiny model on the project's 2-core VM, during which no request moves (a p99 latency spike),
    65 ms even in the benchmark's process with no torch. Requests' records do survive younger
    collections (log lines and metric updates wait to be written in batches): in the benchmark a
    full collection came every ~4,000 requests and cost ~16 µs per request on average, more than
    the metrics themselves. Frozen objects are still freed by reference counting; `gc.collect()`
    first, so no garbage is frozen. The Python docs give gc.freeze for the pre-fork case; the
    collections it spares here are the same ones.
    """
    gc.collect()
    gc.freeze()


def _model_dir(engine: Engine) -> list[str]:
    """The filesystem to watch when SLM_DISK_PATHS is not set: the loaded model's own directory."""
    source = engine.info.source if engine.loaded else ""
    return [source] if source and os.path.isdir(source) else []


def _default_observer(metrics: ServerMetrics | NullMetrics) -> SignalObserver | None:
    if not metrics.enabled:
        return None  # the uninstrumented baseline watches nothing
    from slm_server.drift import for_server

    return cast(SignalObserver | None, for_server(metrics))


async def _load(service: GenerationService, metrics: ServerMetrics | NullMetrics) -> None:
    if service.ready:
        return
    engine = service.engine
    if not engine.loaded:
        started = time.perf_counter()
        try:
            await asyncio.to_thread(engine.load)
        except Exception as exc:
            service.load_error = f"{type(exc).__name__}: {exc}"
            _event("the model failed to load", "model_load_failed", level=logging.ERROR, exc_info=exc)
            return
        load_seconds = time.perf_counter() - started
    else:
        load_seconds = 0.0
    info = engine.info
    metrics.set_model(
        source=info.source,
        dtype=info.dtype,
        device=info.device,
        max_context=info.max_context,
        load_seconds=load_seconds,
    )
    _freeze_startup_objects()
    service.ready = True
    _event(
        "model loaded",
        "model_loaded",
        {
            "gen_ai.request.model": info.name,
            "slm.model_source": info.source,
            "slm.device": info.device,
            "slm.dtype": info.dtype,
            "slm.max_context": info.max_context,
            "slm.batching": info.batching,
            "slm.prefix_caching": info.prefix_caching,
            "slm.structured_output": info.structured_output,
            "slm.default_temperature": info.default_temperature,
            "slm.default_top_p": info.default_top_p,
            "slm.default_top_k": info.default_top_k,
            "slm.output_hash": service.output_policy.key_source,
            "slm.parameters": info.parameters,
            "slm.load_seconds": round(load_seconds, 3),
        },
    )
