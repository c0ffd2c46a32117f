"""Serving a request leaves no reference cycle behind.

A cycle is freed only by the garbage collector, and a full collection stops every request while it
walks all of the process's objects; each request making one (as a job pointing back at its request's
record once did) made those collections come every few thousand requests. The app is driven through
its ASGI interface directly: an HTTP client's own objects would blur the count.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
from typing import Any

from prometheus_client import CollectorRegistry

from slm_server.app import create_app
from slm_server.logs import flush_lines

from .conftest import MODEL_NAME, settings_for

CHAT = [{"role": "user", "content": "Hi"}]
REQUESTS: list[tuple[str, dict[str, Any], int]] = [
    ("/generate", {"prompt": "Return the", "max_tokens": 4}, 200),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "Return the", "max_tokens": 4, "n": 2, "logprobs": 1}, 200),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 4, "stream": True, "n": 2}, 200),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 100_000}, 400),
    ("/generate", {"prompt": 3}, 422),
]


async def _call(app: Any, path: str, body: dict[str, Any]) -> int:
    data = json.dumps(body).encode()
    sent = False
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    await app(scope, receive, send)
    return messages[0]["status"]


def test_serving_requests_leaves_no_reference_cycles(tiny_engine, tiny_model_dir, json_records):
    app = create_app(settings_for(tiny_model_dir), engine=tiny_engine, registry=CollectorRegistry())

    async def serve() -> collections.Counter:
        async with app.router.lifespan_context(app):
            for path, body, status in REQUESTS:  # warm-up: first-use caches are not garbage
                assert await _call(app, path, body) == status
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection would free lands in gc.garbage
            try:
                for _ in range(3):
                    for path, body, status in REQUESTS:
                        assert await _call(app, path, body) == status
                flush_lines()  # the request lines are written and dropped
                gc.collect()
                return collections.Counter(type(o).__qualname__ for o in gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()

    garbage = asyncio.run(serve())
    assert not garbage, f"objects only the garbage collector could free: {garbage.most_common(10)}"
    assert len(json_records("request")) == 4 * len(REQUESTS)  # the requests were served and logged
