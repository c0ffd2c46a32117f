"""The request middleware, as plain ASGI (Starlette's BaseHTTPMiddleware costs a task and a memory
stream per request).

Per HTTP request, always (serving, with monitoring off too): takes or makes a request id
(`x-request-id`, echoed in the response and the response's `id`), refuses bodies over the size cap
(413, from `content-length` or while reading) and bodies that have not arrived by the request's
deadline (408: a client that trickles its body in cannot hold a connection and a handler for
longer), and puts the request's `RequestRecord` where the handlers find it. With monitoring on
(`metrics_enabled` or `log_requests`), also: reads the W3C
`traceparent`, times the response until its last byte (streams included), counts it in the seed's
`api_requests_total` / `api_request_duration_seconds` through children bound in advance, and queues
the request's JSON log line (slm_server.logs.JsonLines; `request_doc` makes it when it is written)
with what the service put into the record.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slm_server.errors import error_body
from slm_server.logs import access_log, parse_traceparent, request_doc, request_lines
from slm_server.metrics import NullMetrics, ServerMetrics
from slm_server.service.jobs import RequestRecord
from slm_server.settings import Settings

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RECORD_KEY = "slm_record"  # in scope["state"], so handlers see it as request.state.slm_record


# Request ids need to be unique, not secret: 64 random bits per process (new ones in a forked
# child) and a counter, 24 hex digits in all. A getrandom() call per request would cost more than
# the rest of the middleware. They are made 1,024 at a time and handed out with a list pop: made
# one per request, between two requests' other work, formatting one cost ~3.5 µs of CPU in a
# uvicorn worker (cold caches; 0.3 µs in a tight loop), about what all the metric updates cost.
_ID_BATCH = 1024
_ids = itertools.count()
_prefix = os.urandom(8).hex()
_ready_ids: list[str] = []


def _new_prefix() -> None:
    global _prefix
    _prefix = os.urandom(8).hex()
    _ready_ids.clear()  # the parent's, which it hands out too


os.register_at_fork(after_in_child=_new_prefix)


def _new_request_id() -> str:
    try:
        return _ready_ids.pop()
    except IndexError:
        numbers = [next(_ids) for _ in range(_ID_BATCH)]  # drawn one by one: unique across threads
        prefix = _prefix
        # Reversed, so that popping from the end hands them out in increasing order.
        _ready_ids.extend([f"{prefix}{n & 0xFFFFFFFF:08x}" for n in reversed(numbers)])
        return _ready_ids.pop()


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, settings: Settings, metrics: ServerMetrics | NullMetrics):
        self.app = app
        self.metrics = metrics
        self.max_body = settings.max_body_bytes
        self.timeout = settings.request_timeout_seconds
        self.log_requests = settings.log_requests
        self.log_probes = settings.log_probes
        self.monitor = metrics.enabled or settings.log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # A dict made in C, then three lookups: cheaper than a Python loop over the headers (once
        # per request, code runs with cold caches, so fewer Python steps is what counts).
        headers = dict(scope["headers"])
        value = headers.get(b"x-request-id")
        if value is not None and 0 < len(value) <= 128 and value.isascii() and value.decode().isprintable():
            request_id = value.decode()
        else:
            request_id = _new_request_id()
        value = headers.get(b"content-length")
        length = int(value) if value is not None and value.isdigit() else -1
        record = RequestRecord(request_id, start)
        scope.setdefault("state", {})[RECORD_KEY] = record
        status = 500
        id_header = (b"x-request-id", request_id.encode())

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers")
                if type(headers) is list:  # Starlette's responses: their own list, appended in place
                    headers.append(id_header)
                else:
                    message["headers"] = [*(headers or ()), id_header]
            await send(message)

        try:
            if length > self.max_body:
                await self._too_large(send_wrapper, length)
            else:
                await self.app(scope, self._body_reader(receive, length), send_wrapper)
        finally:
            if self.monitor:
                elapsed = time.perf_counter() - start
                path = scope["path"]
                self.metrics.route(path).observe(status, elapsed)
                if self.log_requests and (self.log_probes or path not in PROBE_PATHS):
                    value = headers.get(b"traceparent")
                    if value is not None:
                        record.trace_id, span_id = parse_traceparent(value.decode("latin-1"))
                    else:
                        span_id = None
                    self._log(scope, record, status, elapsed, span_id)

    def _body_reader(self, receive: Receive, length: int) -> Receive:
        """`receive`, bounded while the body arrives: by the request's deadline (408), and for a body
        without a content-length by the size cap as it is counted (413; with one, the server's HTTP
        parser delivers exactly that many bytes, checked before). Once the body is in, the messages
        (a disconnect) pass as they come. The errors are HTTPExceptions because FastAPI re-raises only
        those from body reading (anything else becomes a 400 "error parsing the body")."""
        seen = 0
        limit = self.max_body
        timeout = self.timeout
        deadline = asyncio.get_running_loop().time() + timeout
        reading = True

        async def receive_body() -> Message:
            nonlocal seen, reading
            if not reading:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                reading = False
                raise HTTPException(
                    408, f"the request body did not arrive within {timeout:g} s (request_timeout_seconds)"
                ) from None
            if message["type"] != "http.request":
                reading = False
                return message
            if length < 0:
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes (max_body_bytes)")
            reading = message.get("more_body", False)
            return message

        return receive_body

    async def _too_large(self, send: Send, length: int) -> None:
        message = f"request body is {length} bytes; the limit is {self.max_body} bytes (max_body_bytes)"
        body = json.dumps(error_body(413, message, "invalid_request_error")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _log(self, scope: Scope, record: RequestRecord, status: int, elapsed: float, span_id: str | None) -> None:
        error = status >= 500
        lines = request_lines()
        if lines is not None and not (error or lines.info):
            return
        path = scope["path"]
        line = (
            time.time(),
            status,
            elapsed,
            scope["method"],
            path if path in self.metrics.routes else "other",
            record.request_id,
            record.trace_id,
            span_id,
            record,  # the record ends with this request: the line keeps it and reads it when written
        )
        if lines is not None:
            lines.write(line, urgent=error)  # made into JSON and written off the request path
        else:  # no configure_logging: the embedding program's logging
            fields = request_doc(line)
            for key in ("timestamp", "level", "logger", "message"):
                del fields[key]
            access_log.log(logging.ERROR if error else logging.INFO, "request", extra={"fields": fields})
