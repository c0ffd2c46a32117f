"""Helpers the routers share."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Request

from slm_server.middleware import RECORD_KEY
from slm_server.service.jobs import RequestRecord
from slm_server.service.serving import GenerationService

# Prompts longer than this are tokenized in a thread, so one huge body cannot stall the event loop.
_INLINE_TOKENIZE_CHARS = 16_384


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


async def encode(service: GenerationService, text: str) -> list[int]:
    if len(text) > _INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(service.engine.encode, text)
    return service.engine.encode(text)


def sse(doc: dict[str, Any]) -> str:
    """One server-sent event carrying `doc` as compact JSON."""
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"
