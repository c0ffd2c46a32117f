"""The sidecar: a reverse proxy in front of a runtime on loopback, instrumented with the built-in server's
own code.

    app = create_app(SidecarSettings(upstream_url="http://127.0.0.1:8080", served_model_name="phi-3"))

Per request, the built-in server's `RequestMiddleware` (request id, body cap and deadline, traceparent,
`api_requests_total`, the JSON request line) wraps a plain ASGI proxy:

- POST /v1/completions, /v1/chat/completions: forwarded, with `logprobs` added when the client did not ask
  for them (slm_sidecar.replies), and taken out of the reply; streams pass event by event as they arrive.
- POST /generate: the seed's route, translated to /v1/completions (slm_sidecar.generate).
- GET /v1/models: forwarded as it is.
- GET /healthz: the sidecar itself; GET /readyz: the runtime's readiness (SLM_UPSTREAM_HEALTH_PATH);
  GET /metrics: the `slm_*` series.

Each generation ends in the server's accounting (slm_server.service.accounting.Accounting): the same
`slm_*` metrics, request-line fields and drift signals (slm_server.drift) as the built-in server's, read
from the runtime's reply. A client that goes away stops the runtime's work (the connection to it is
closed); the runtime's errors keep their status and are counted; a runtime that does not answer gets 503,
one that answers too late 504 (request_timeout_seconds from arrival, as in the server).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import httpx
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from slm_server.errors import (
    InvalidInput,
    ModelFailure,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
    ServerError,
    error_body,
)
from slm_server.logs import OutputLogPolicy, flush_lines
from slm_server.metrics import NullMetrics, ServerMetrics
from slm_server.middleware import RECORD_KEY, RequestMiddleware
from slm_server.service.accounting import Accounting
from slm_server.service.faults import Faults, InjectedFault
from slm_server.service.jobs import Job, Outcome, RequestParams, RequestRecord
from slm_server.service.serving import GenerationService
from slm_server.signals import NoopObserver, SignalObserver
from slm_sidecar import __version__, generate
from slm_sidecar.replies import CHAT, COMPLETIONS, GENERATE, Choices, Plan, ProxiedResult, plan_request
from slm_sidecar.settings import SidecarSettings
from slm_sidecar.upstream import Reply, Unreachable, Upstream, UpstreamError

if TYPE_CHECKING:
    from slm_server.drift import DriftSettings

log = logging.getLogger("slm_sidecar")

# Request headers not forwarded: the connection's own, and those the sidecar sets.
_HOP = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"accept-encoding",
        b"x-request-id",
        b"expect",
    }
)
# Response headers not passed back: the connection's own, those uvicorn and the middleware set.
_HOP_BACK = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"content-encoding",
        b"date",
        b"server",
        b"x-request-id",
    }
)
_JSON = [(b"content-type", b"application/json")]
_EVENT_END = (b"\n\n", b"\r\n\r\n")


def _event(message: str, event: str, fields: dict[str, Any] | None = None, level: int = logging.INFO) -> None:
    log.log(level, message, extra={"fields": {"event": event, **(fields or {})}})


class _Gone(Exception):
    """The client went away."""


@dataclasses.dataclass
class _Exchange:
    """What one proxied generation request learned."""

    plan: Plan
    choices: Choices
    error: ServerError | BaseException | None = None
    timed_out: bool = False
    gone: bool = False
    refused: bool = False  # ended before the runtime generated (its error status, no connection)


class Sidecar:
    """The ASGI app (the middleware inside). Build it with `create_app`."""

    def __init__(
        self,
        settings: SidecarSettings,
        registry: CollectorRegistry | None = None,
        signals: SignalObserver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        drift: DriftSettings | None = None,
    ):
        self.settings = settings
        self.model_name = settings.model_name
        if settings.metrics_enabled:
            registry = registry if registry is not None else CollectorRegistry()
            self.metrics: ServerMetrics | NullMetrics = ServerMetrics(registry, self.model_name)
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=registry)
        else:
            self.metrics = NullMetrics(self.model_name)
        if signals is None and self.metrics.enabled:
            # Imported only here: a sidecar without metrics carries no drift detector (numpy).
            from slm_server.drift import for_server

            signals = cast(SignalObserver | None, for_server(self.metrics, drift))
        self.signals = signals or NoopObserver()
        self.accounting = Accounting(self.metrics, self.signals, self.model_name)
        self.output_policy = OutputLogPolicy(settings)
        self.faults = Faults.from_settings(settings)
        self.base = settings.upstream_base
        self.in_flight = 0
        self.model_described = False
        self.logprobs_refused: set[str] = set()  # routes whose runtime refused the added logprobs
        self.logprobs_missing_logged = False
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        host, port = settings.upstream_address
        self.upstream = Upstream(host, port, connect_timeout=settings.upstream_connect_timeout_seconds)
        self._random = random.Random()
        self.metrics.watch_load(lambda: self.in_flight, lambda: 0)
        # The built-in server's own rule for the slm_fault_injection_enabled gauge (settings, faults).
        self.metrics.fault_injection.set_function(lambda: GenerationService.faults_possible(cast(Any, self)))
        self._asgi = RequestMiddleware(self._app, settings=settings, metrics=self.metrics)
        self._routes: dict[str, tuple[str, Callable[[Scope, Receive, Send], Awaitable[None]]]] = {
            COMPLETIONS: ("POST", self._generation),
            CHAT: ("POST", self._generation),
            GENERATE: ("POST", self._generation),
            "/v1/models": ("GET", self._models),
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
        }
        if self.metrics.enabled:
            self._routes["/metrics"] = ("GET", self._metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)

    @property
    def registry(self) -> CollectorRegistry | None:
        return self.metrics.registry if isinstance(self.metrics, ServerMetrics) else None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            s = self.settings
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(None, connect=s.upstream_connect_timeout_seconds),
                limits=httpx.Limits(max_connections=s.max_connections, max_keepalive_connections=s.max_connections),
                follow_redirects=False,
                trust_env=False,  # never a proxy from the environment between the sidecar and its runtime
            )
        return self._client

    # --- lifecycle --------------------------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        listener = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    listener = await self._startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                _event("shutting down", "shutdown", {"in_flight": self.in_flight})
                if listener is not None:
                    await listener.stop()
                if self._client is not None:
                    await self._client.aclose()
                self.upstream.close()
                _event("stopped", "shutdown")
                flush_lines()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _startup(self) -> Any:
        s = self.settings
        _event(
            "sidecar starting",
            "startup",
            {
                "slm.version": __version__,
                "gen_ai.request.model": self.model_name,
                "slm.runtime": s.runtime,
                "slm.upstream": self.base,
                "slm.quality_logprobs": s.quality_logprobs,
                "slm.fault_injection": s.fault_injection,
                "slm.log_outputs": s.log_outputs,
                "slm.output_hash": self.output_policy.key_source,
            },
        )
        _ = self.client
        if not s.fault_admin_api:
            return None
        from slm_server.admin import AdminListener, admin_app

        # The server's admin API reads and changes `service.faults`: the sidecar's, here.
        listener = AdminListener(admin_app(cast(GenerationService, self), s), s)
        await listener.start()
        return listener

    # --- dispatch -----------------------------------------------------------------------------------------
    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        route = self._routes.get(scope["path"])
        if route is None:
            await _reply(send, 404, error_body(404, f"no route {scope['path']} on this server", "not_found_error"))
            return
        method, handler = route
        if scope["method"] != method:
            message = f"{scope['path']} takes {method}, not {scope['method']}"
            await _reply(send, 405, error_body(405, message, "invalid_request_error"), [(b"allow", method.encode())])
            return
        await handler(scope, receive, send)

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _reply(send, 200, {"status": "ok"})

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Ready when the runtime says it is (its health endpoint): the Service sends no request to a pod
        whose runtime is still loading its model."""
        url = self.base + self.settings.upstream_health_path
        try:
            answer = await self.client.get(url, timeout=httpx.Timeout(2.0))
            status: int | str = answer.status_code
        except httpx.HTTPError as exc:
            status = f"{type(exc).__name__}: {exc}"
        if status != 200:
            body = {"status": "runtime not ready", "runtime": url, "runtime_status": status}
            await _reply(send, 503, body, [(b"retry-after", b"5")])
            return
        if not self.model_described:
            await self._describe_model()
        await _reply(send, 200, {"status": "ready", "model": self.model_name})

    async def _describe_model(self) -> None:
        """slm_model_info, once the runtime answers: its context length from /v1/models where it says it."""
        max_context = 0
        try:
            answer = await self.client.get(self.base + "/v1/models", timeout=httpx.Timeout(2.0))
            for card in answer.json().get("data", []):
                length = card.get("max_model_len") or (card.get("meta") or {}).get("n_ctx_train")
                if isinstance(length, int):
                    max_context = length
                    break
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        s = self.settings
        self.metrics.set_model(source=s.model, dtype=s.dtype, device=s.runtime, max_context=max_context, load_seconds=0)
        self.model_described = True

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        registry = self.registry
        assert registry is not None
        body = generate_latest(registry)
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = _record(scope)
        request = self.client.build_request("GET", self.base + "/v1/models", headers=self._headers(scope, record))
        try:
            async with asyncio.timeout(self.settings.request_timeout_seconds):
                answer = await self.client.send(request)
        except (httpx.HTTPError, TimeoutError) as exc:
            await self._unreachable(send, exc)
            return
        await _respond(send, answer.status_code, _headers_back(answer), answer.content)

    # --- generations --------------------------------------------------------------------------------------
    async def _generation(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope["path"]
        record = _record(scope)
        gm = self.metrics.generation[route]
        try:
            raw = await _read_body(receive)
        except HTTPException as exc:  # the middleware's body cap (413) or deadline (408)
            gm.error("invalid_input")
            await _reply(send, exc.status_code, error_body(exc.status_code, str(exc.detail), "invalid_request_error"))
            return
        except _Gone:
            return
        faults = self.faults
        degraded = False
        if faults.enabled and (faults.latency_seconds or faults.error_rate or faults.degraded_rate):
            degraded = faults.degraded_rate > 0 and self._random.random() < faults.degraded_rate
        strip_absent = self.settings.runtime == "llamacpp" and route == CHAT
        logprobs = self.settings.quality_logprobs and route not in self.logprobs_refused
        if route == GENERATE:
            planned = generate.plan(raw, self.settings, degraded=degraded)
            if isinstance(planned, ServerError):
                gm.error(planned.error_kind)
                body = error_body(planned.status, planned.message, planned.type, planned.param)
                await _reply(send, planned.status, body)
                return
            plan = planned
        else:
            plan = plan_request(
                route,
                raw,
                quality_logprobs=logprobs,
                strip_absent=strip_absent,
                degraded=degraded,
                runtime=self.settings.runtime,
            )
        exchange = _Exchange(plan, Choices(plan))
        self.in_flight += 1
        try:
            injecting = faults.enabled and (faults.latency_seconds or faults.error_rate)
            if injecting and await self._injected(exchange, record, receive, send):
                return
            await self._forward(exchange, scope, record, receive, send)
        finally:
            self.in_flight -= 1
            self._account(exchange, record)

    async def _injected(self, exchange: _Exchange, record: RequestRecord, receive: Receive, send: Send) -> bool:
        """Fault injection before the runtime is asked (as the built-in server applies it before generating):
        the added latency, then an injected failure. True when the request ended here."""
        faults = self.faults
        if faults.latency_seconds:
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({gone}, timeout=faults.latency_seconds)
            finally:
                gone.cancel()
            if gone.done() and not gone.cancelled():
                exchange.gone = True
                await _reply(send, 499, error_body(499, "the client closed the connection", "client_closed_request"))
                return True
        if faults.error_rate and self._random.random() < faults.error_rate:
            fault = InjectedFault("injected fault (fault_error_rate)")
            exchange.error = fault
            exchange.refused = True
            await _reply(send, 500, error_body(500, f"generation failed: {fault}", "server_error"))
            return True
        return False

    async def _forward(
        self, exchange: _Exchange, scope: Scope, record: RequestRecord, receive: Receive, send: Send
    ) -> None:
        """Ask the runtime, and answer the client, watching for the client going away and the deadline."""
        task = asyncio.current_task()
        assert task is not None
        done = False

        async def watch() -> None:
            await _disconnected(receive)
            if not done:
                exchange.gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (record.start + self.settings.request_timeout_seconds - time.perf_counter())
        sender = _Sender(send)
        try:
            async with asyncio.timeout_at(deadline):
                await self._exchange(exchange, scope, record, sender)
            done = True
        except TimeoutError:
            done = True
            exchange.timed_out = True
            await self._timed_out(exchange, sender)
        except asyncio.CancelledError:
            if not exchange.gone:
                raise
            done = True
            task.uncancel()
            # Nothing reaches the client any more; the status is for the request line (nginx's 499).
            if not sender.started:
                await _reply(send, 499, error_body(499, "the client closed the connection", "client_closed_request"))
        finally:
            done = True
            watcher.cancel()

    async def _exchange(self, exchange: _Exchange, scope: Scope, record: RequestRecord, sender: _Sender) -> None:
        plan = exchange.plan
        upstream = (COMPLETIONS if plan.route == GENERATE else plan.route).encode()
        headers = self._headers(scope, record)
        try:
            response = await self.upstream.request(b"POST", upstream, headers, plan.body)
        except UpstreamError as exc:
            exchange.refused = True
            if isinstance(exc, Unreachable):
                exchange.error = ModelNotReady(f"the runtime at {self.base} did not answer: {exc}")
                await self._unreachable(sender.send, exc)
            else:
                exchange.error = ModelFailure(str(exc))
                await _reply(sender.send, 502, error_body(502, str(exc), "server_error"))
            return
        try:
            if response.status >= 400 and plan.added_logprobs and await self._refuses_logprobs(response, upstream):
                # A runtime that refuses the log-probabilities the sidecar asked for: ask again without them.
                await response.aclose()
                plan = exchange.plan = _without_logprobs(plan)
                exchange.choices = Choices(plan)
                response = await self.upstream.request(b"POST", upstream, headers, plan.body)
            streamed = response.status == 200 and (response.header(b"content-type") or b"").startswith(
                b"text/event-stream"
            )
            if plan.stream and streamed:
                await self._relay_stream(exchange, response, record, sender)
            else:
                await self._relay_whole(exchange, response, record, sender)
        except UpstreamError as exc:  # the runtime went away mid-reply
            exchange.error = ModelFailure(str(exc))
            if sender.started:
                await sender.event(error_body(502, exchange.error.message, "server_error"))
                await sender.end()
            else:
                await _reply(sender.send, 502, error_body(502, exchange.error.message, "server_error"))
        finally:
            await response.aclose()

    async def _refuses_logprobs(self, response: Reply, path: bytes) -> bool:
        if response.status not in (400, 422):
            return False
        body = await response.read()
        if b"logprob" not in body.lower():
            return False
        route = path.decode()
        self.logprobs_refused.add(route)
        _event(
            f"the runtime refuses log-probabilities on {route}: no perplexity for its requests",
            "perplexity_unavailable",
            {"http.route": route, "reason": body[:300].decode("utf-8", "replace")},
            logging.WARNING,
        )
        return True

    async def _relay_whole(self, exchange: _Exchange, response: Reply, record: RequestRecord, sender: _Sender) -> None:
        """An unstreamed reply (or an error reply to a stream request): read whole, its added fields taken out."""
        body = await response.read()
        status = response.status
        plan = exchange.plan
        if status >= 400:
            exchange.refused = status not in (500, 502, 504)
            exchange.error = _upstream_error(status, body)
            exchange.timed_out = status == 504
            await _respond(sender.send, status, _headers_back(response), body)
            return
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if plan.route == GENERATE:
            exchange.choices.read_reply(doc)
            results, _ = exchange.choices.results()
            reply = generate.response(record, self.model_name, results, plan)
            await _reply(sender.send, 200, reply)
            self._check_logprobs(exchange)
            return
        if exchange.choices.read_reply(doc):
            body = orjson.dumps(doc)
        self._check_logprobs(exchange)
        await _respond(sender.send, status, _headers_back(response), body)

    async def _relay_stream(self, exchange: _Exchange, response: Reply, record: RequestRecord, sender: _Sender) -> None:
        """Server-sent events, each passed on as soon as it is whole (its added fields taken out)."""
        plan, choices = exchange.plan, exchange.choices
        translate = plan.route == GENERATE
        if translate:
            await sender.start(200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")])
        else:
            await sender.start(response.status, _headers_back(response))
        buffer = b""
        async for data in response.pieces():
            buffer = buffer + data if buffer else data
            while True:
                end, size = _event_end(buffer)
                if end < 0:
                    break
                event, buffer = buffer[: end + size], buffer[end + size :]
                out = self._read_event(exchange, event, time.perf_counter())
                if out:
                    await sender.body(out)
        if buffer and not translate:
            await sender.body(buffer)
        if translate:
            if exchange.error is None:
                results, _ = choices.results()
                await sender.event(generate.response(record, self.model_name, results, plan))
            await sender.body(b"data: [DONE]\n\n")
        self._check_logprobs(exchange)
        await sender.end()

    def _read_event(self, exchange: _Exchange, event: bytes, now: float) -> bytes | None:
        """One server-sent event: what goes to the client (the event itself when nothing was taken out)."""
        body = event.rstrip(b"\r\n")
        if not body.startswith(b"data:") or b"\n" in body:
            return event if exchange.plan.route != GENERATE else None
        payload = body[5:].strip()
        if payload == b"[DONE]":
            return event if exchange.plan.route != GENERATE else None
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event if exchange.plan.route != GENERATE else None
        if isinstance(doc, dict) and "error" in doc and "choices" not in doc:
            exchange.error = _error_event(doc)
            return event if exchange.plan.route != GENERATE else _sse(doc)
        choices = exchange.choices
        if exchange.plan.route == GENERATE:
            before = {i: len(s.text) for i, s in choices.by_index.items()}
            choices.read_chunk(doc, now)
            pieces = ["".join(s.text[before.get(i, 0) :]) for i, s in sorted(choices.by_index.items())]
            text = "".join(pieces)
            return _sse({"text": text}) if text else None
        changed = choices.read_chunk(doc, now)
        if changed is None:
            return None
        if changed:
            return b"data: " + orjson.dumps(doc) + event[len(body) :]
        return event

    def _check_logprobs(self, exchange: _Exchange) -> None:
        """One event when a runtime gives no log-probabilities though they were asked for."""
        plan = exchange.plan
        if self.logprobs_missing_logged or not (plan.added_logprobs or plan.route == GENERATE):
            return
        states = exchange.choices.by_index.values()
        if states and not any(state.saw_logprobs for state in states):
            self.logprobs_missing_logged = True
            _event(
                f"the runtime's reply on {plan.route} has no log-probabilities though the sidecar asked for them: "
                "slm_request_perplexity stays empty for its requests; the other signals are measured",
                "perplexity_unavailable",
                {"http.route": plan.route, "reason": "no logprobs in the reply"},
                logging.WARNING,
            )

    async def _timed_out(self, exchange: _Exchange, sender: _Sender) -> None:
        message = f"request timed out after {self.settings.request_timeout_seconds:g} s (request_timeout_seconds)"
        exchange.error = None
        if sender.started:
            await sender.event(error_body(504, message, "timeout_error"))
            await sender.body(b"data: [DONE]\n\n")
            await sender.end()
        else:
            await _reply(sender.send, 504, error_body(504, message, "timeout_error"))

    async def _unreachable(self, send: Send, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError | httpx.TimeoutException) and not isinstance(
            exc, httpx.ConnectTimeout | Unreachable
        ):
            message = f"the runtime did not answer within {self.settings.request_timeout_seconds:g} s"
            await _reply(send, 504, error_body(504, message, "timeout_error"))
            return
        message = f"the runtime at {self.base} is not answering ({type(exc).__name__}: {exc})"
        await _reply(send, 503, error_body(503, message, "service_unavailable"), [(b"retry-after", b"5")])

    def _headers(self, scope: Scope, record: RequestRecord) -> list[tuple[bytes, bytes]]:
        """The client's headers for the runtime (authorization, traceparent…), with the request's id."""
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP]
        headers.append((b"x-request-id", record.request_id.encode()))
        headers.append((b"accept-encoding", b"identity"))
        return headers

    # --- accounting ---------------------------------------------------------------------------------------
    def _account(self, exchange: _Exchange, record: RequestRecord) -> None:
        """The request's generations into the server's accounting: metrics, request line, drift signals."""
        plan = exchange.plan
        found, form = exchange.choices.results()
        error = None if exchange.gone else exchange.error
        results: list[ProxiedResult | None] = list(found)
        if exchange.gone:
            for each in found:
                each.finish_reason = "abort"
            if not results:
                results = [ProxiedResult([], "", "abort", 0, count=0, logprobs_known=False)]
        elif exchange.refused or not results:
            results = [None]  # ended before the runtime generated: one failed generation
            if error is None and not exchange.timed_out:
                error = ModelFailure("the runtime's reply has no choices")
        params = plan.params if form is None else dataclasses.replace(plan.params, grammar=cast(Any, form))
        prompt_tokens = exchange.choices.prompt_tokens or 0
        outcomes: list[Outcome | None] = [None] * len(results)
        record.request = RequestParams(plan.operation, params, prompt_tokens, plan.stream)
        record.outcomes = outcomes
        record.model = self.model_name
        record.policy = self.output_policy
        prompt_ids = cast(list[int], range(prompt_tokens))  # the accounting only counts them
        for index, result in enumerate(results):
            job = Job(plan.route, plan.operation, prompt_ids, params, record.request_id, record.start)
            job.stream, job.index = plan.stream, index
            job.outcomes = outcomes
            job.timed_out = exchange.timed_out
            self.accounting.finish(job, result, error)


class _Sender:
    """The response to the client, once started: pieces of body as they come."""

    __slots__ = ("send", "started")

    def __init__(self, send: Send):
        self.send = send
        self.started = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def event(self, doc: Any) -> None:
        await self.body(_sse(doc))

    async def end(self) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(
    settings: SidecarSettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
    signals: SignalObserver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    drift: DriftSettings | None = None,
) -> Sidecar:
    """The sidecar's ASGI app. settings: the environment's (`SLM_*`) when None; registry: a fresh one when
    None; signals: slm_server.drift's detector by default (`drift`: its settings, else `SLM_DRIFT_*`);
    transport: httpx's, for tests."""
    return Sidecar(settings or SidecarSettings(), registry, signals, transport, drift)  # type: ignore[call-arg]


def _record(scope: Scope) -> RequestRecord:
    state = scope.get("state") or {}
    record = state.get(RECORD_KEY)
    return record if record is not None else RequestRecord("-", time.perf_counter())


def _without_logprobs(plan: Plan) -> Plan:
    doc = orjson.loads(plan.body)
    doc.pop("logprobs", None)
    doc.pop("top_logprobs", None)
    return dataclasses.replace(plan, body=orjson.dumps(doc), added_logprobs=False)


def _upstream_error(status: int, body: bytes) -> ServerError:
    """The runtime's error reply, as the built-in server's error of that kind (slm_request_errors_total)."""
    message = body[:500].decode("utf-8", "replace")
    try:
        doc = orjson.loads(body)
        detail = doc.get("error", doc) if isinstance(doc, dict) else None
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            message = detail["message"]
        elif isinstance(detail, str):
            message = detail
    except orjson.JSONDecodeError:
        pass
    kind: type[ServerError]
    if status == 429:
        kind = Overloaded
    elif status == 503:
        kind = ModelNotReady
    elif status == 504:
        kind = RequestTimeout
    elif status >= 500:
        kind = ModelFailure
    else:
        kind = InvalidInput
    error = kind(f"the runtime answered {status}: {message}")
    error.status = status
    return error


def _error_event(doc: dict[str, Any]) -> ServerError:
    detail = doc.get("error")
    code = detail.get("code") if isinstance(detail, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return _upstream_error(status, orjson.dumps(doc))


def _event_end(buffer: bytes) -> tuple[int, int]:
    """Where the first whole server-sent event of `buffer` ends, and its separator's length; (-1, 0) if none."""
    best, size = -1, 0
    for separator in _EVENT_END:
        at = buffer.find(separator)
        if at >= 0 and (best < 0 or at < best):
            best, size = at, len(separator)
    return best, size


def _sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def _headers_back(response: httpx.Response | Reply) -> list[tuple[bytes, bytes]]:
    if isinstance(response, httpx.Response):
        raw = [(k.lower(), v) for k, v in response.headers.raw]
    else:
        raw = response.headers
    return [(k, v) for k, v in raw if k not in _HOP_BACK]  # (names come lowercase from both clients)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (the body is read by then: the next message is the disconnect)."""
    message: Message = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _reply(send: Send, status: int, doc: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _respond(send, status, [*_JSON, *(headers or [])], orjson.dumps(doc))
