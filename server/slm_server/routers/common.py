"""Helpers the routers share."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from slm_server.middleware import RECORD_KEY
from slm_server.service.jobs import RequestRecord
from slm_server.service.serving import GenerationService


def service_of(request: Request) -> GenerationService:
    return request.app.state.service


def record_of(request: Request) -> RequestRecord:
    """The middleware's record of this request; a detached one for a router used without
    `create_app`'s middleware."""
    state = request.scope.get("state") or {}
    record = state.get(RECORD_KEY)
    if record is None:
        record = RequestRecord("-", time.perf_counter())
    return record


def disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns once the client has gone (for a non-streamed response: a
    streamed one learns it from its failing writes). The body is read by then, so the next message the
    server hands the app is the disconnect (or, once the response is sent, the end of the exchange)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def sse(doc: dict[str, Any]) -> str:
    """One server-sent event carrying `doc` as compact JSON."""
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"
