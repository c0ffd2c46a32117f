"""JSON-lines logging: one writer of JSON lines per process, fed by stdlib `logging` and, for the
per-request access line, directly by the request middleware.

Every line is one JSON object: `timestamp` (RFC 3339, UTC), `level`, `logger`, `message`, plus the
record's `fields` (passed as `extra={"fields": {...}}`). Field names follow the OpenTelemetry
semantic conventions where one exists (`http.route`, `http.response.status_code`,
`gen_ai.request.model`, `gen_ai.usage.input_tokens`, `gen_ai.response.finish_reasons`,
`exception.stacktrace`, `trace_id`, …) and carry an `slm.` prefix where none does.

Events (the `event` field): request, startup, model_loaded, model_load_failed, gpu_found,
gpu_missing, overloaded, shutdown, error.

Why the request line bypasses `logging`: a LogRecord, the handler's lock, stdlib json and a
write + flush per line cost about 30 µs per request on the project's 2-core VM, more than all the
metrics together (`bench/bench_server.py`). The middleware queues one tuple per request in
`JsonLines`, which turns every 32 queued lines into JSON (orjson) and writes them in one call;
its flusher thread writes what is queued every `log_flush_interval_seconds` (0.1 s by default);
warnings, errors and 5xx requests are written at once, and what is left at shutdown, at exit or
on SIGTERM. Other events still go through `logging`, so uvicorn's and the libraries' lines land in
the same stream, in order with the request lines. Without `configure_logging` (the server embedded
in another program, or under pytest), request lines go to the `slm_server.access` logger instead,
like every other line.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import io
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections import deque
from typing import IO, Any, cast

import orjson

from slm_server.settings import Settings

_HANDLER_NAME = "slm_server.json"
_OPTIONS = orjson.OPT_APPEND_NEWLINE
access_log = logging.getLogger("slm_server.access")


class _Timestamps:
    """RFC 3339 UTC with milliseconds; strftime once a second, not once a line."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{int((created - second) * 1000):03d}Z"


def _encode(doc: dict[str, Any]) -> bytes:
    # default=str: a value orjson does not know (a Path, an exception) is written as its text, not
    # an error; NaN and infinities become null (stdlib json would write invalid JSON).
    try:
        return orjson.dumps(doc, default=str, option=_OPTIONS)
    except orjson.JSONEncodeError:
        # A key that is not a string (in a log call's fields) is written as its text too. Only on
        # retry: the option costs every line ~0.4 µs.
        return orjson.dumps(doc, default=str, option=_OPTIONS | orjson.OPT_NON_STR_KEYS)


def record_doc(record: logging.LogRecord) -> dict[str, Any]:
    """A log record as the JSON object of its line, `timestamp` still the epoch float."""
    doc: dict[str, Any] = {
        "timestamp": record.created,
        "level": record.levelname.lower(),
        "logger": record.name,
        "message": record.getMessage(),
    }
    fields = record.__dict__.get("fields")
    if fields:
        doc.update(fields)
    if record.exc_info and record.exc_info[0] is not None:
        exc_type, exc, tb = record.exc_info
        doc["exception.type"] = exc_type.__name__
        doc["exception.message"] = str(exc)
        doc["exception.stacktrace"] = "".join(traceback.format_exception(exc_type, exc, tb))
    return doc


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for any handler (`JsonLinesHandler` defers the encoding)."""

    def __init__(self) -> None:
        super().__init__()
        self._timestamp = _Timestamps()

    def format(self, record: logging.LogRecord) -> str:
        doc = record_doc(record)
        doc["timestamp"] = self._timestamp(record.created)
        return _encode(doc)[:-1].decode()


# Every field a request line can carry (docs/reference/server.md is generated from this and from a
# real line; a field a real line has and this lacks fails the generation).
REQUEST_LINE_FIELDS: dict[str, str] = {
    "timestamp": "RFC 3339 UTC time the response ended, milliseconds",
    "level": "`info`, or `error` for a 5xx response",
    "logger": "`slm_server.access`",
    "message": "`request`",
    "event": "`request`",
    "request_id": "the `x-request-id` header when the client sent a printable one (≤128 characters), else a "
    "new id; echoed in the response's `x-request-id`",
    "http.request.method": "HTTP method",
    "http.route": "the route (`other` for an unknown path; never the raw path)",
    "http.response.status_code": "HTTP status",
    "latency_s": "arrival to the last byte of the response, streams included",
    "trace_id": "W3C trace id from a valid `traceparent` header (absent without one)",
    "span_id": "the caller's span id from `traceparent`",
    "gen_ai.operation.name": "`text_completion` (/generate, /v1/completions) or `chat`",
    "gen_ai.request.model": "the served model name",
    "gen_ai.response.model": "the model that answered",
    "gen_ai.request.max_tokens": "max_tokens after defaults and checks",
    "gen_ai.request.temperature": "sampling temperature",
    "gen_ai.request.top_p": "nucleus sampling mass",
    "gen_ai.request.top_k": "top_k, when sampling among the k most likely tokens only",
    "gen_ai.request.seed": "the request's seed, when it gave one",
    "gen_ai.request.presence_penalty": "presence_penalty, when not 0",
    "gen_ai.request.frequency_penalty": "frequency_penalty, when not 0",
    "gen_ai.output.type": "with structured output: `json` (a JSON response_format or structured_outputs.json, tool "
    "calls) or `text` (structured_outputs' regex, choice or grammar); absent otherwise",
    "gen_ai.usage.input_tokens": "prompt tokens",
    "gen_ai.usage.output_tokens": "generated tokens (of all the choices, with n > 1)",
    "gen_ai.usage.cache_read.input_tokens": "prompt tokens found in the prefix cache, not fed to the model "
    "(per choice, with n > 1)",
    "gen_ai.response.finish_reasons": "`[stop|length|abort|timeout|error]`, one per choice",
    "gen_ai.server.time_to_first_token": "seconds from arrival to the first token of any choice (queue included)",
    "gen_ai.server.time_per_output_token": "mean seconds between a choice's tokens after its first",
    "slm.perplexity": "perplexity of the generated tokens (of all the choices together) under the model "
    "(null without tokens)",
    "slm.queue_time_s": "seconds waited for a generation slot (the longest wait of the choices)",
    "slm.stream": "whether the response was streamed",
    "error.type": "why a generation failed: invalid_input, overloaded, timeout, model_error, not_ready, internal",
    "gen_ai.output.length": "output length in characters (log_outputs hash, truncated, full)",
    "gen_ai.output.hmac_sha256": "HMAC-SHA256 of the output text, keyed by output_hash_key (log_outputs=hash, the "
    "default): equal outputs have equal hashes under one key, and no one without the key can test a guess",
    "gen_ai.output.text": "the output text, cut at log_truncate_chars with log_outputs=truncated",
    "gen_ai.output.truncated": "whether the text was cut (log_outputs=truncated)",
    "gen_ai.request.choice.count": "`n`, the choices asked for, when more than 1",
    "slm.choices": "with n > 1: per choice, `slm.choice.index` and the fields above that describe one generation "
    "(its error, tokens, finish reason, timings, perplexity and output); the outputs of a request are sampled "
    "for logging together",
}

# What the middleware queues per request; `request_doc` makes the line of it, off the request path:
# (time.time(), status, latency seconds, method, route, request id, trace id, span id, the
# request's record: anything with an `add_log_fields(doc)`, the service's RequestRecord).
RequestLine = tuple[float, int, float, str, str, str, "str | None", "str | None", Any]


def request_doc(line: RequestLine) -> dict[str, Any]:
    """The JSON object of one request's access line, `timestamp` still the epoch float."""
    created, status, elapsed, method, route, request_id, trace_id, span_id, record = line
    doc: dict[str, Any] = {
        "timestamp": created,
        "level": "error" if status >= 500 else "info",
        "logger": "slm_server.access",
        "message": "request",
        "event": "request",
        "request_id": request_id,
        "http.request.method": method,
        "http.route": route,
        "http.response.status_code": status,
        "latency_s": round(elapsed, 6),
    }
    if trace_id:
        doc["trace_id"] = trace_id
        doc["span_id"] = span_id
    record.add_log_fields(doc)
    return doc


# Once this many lines are queued, the writer of the last one encodes and writes them all itself.
# The flusher thread's 0.1 s batch is ~500 lines at a busy server's rate: its lines' objects and its
# ~0.5 MB buffer no longer fit the CPU's cache by the time it is encoded, and the request line cost
# ~10 µs more than with batches of 16 to 64 (bench_server's workers, same-process A/B). The price is
# one write of ~25 KB per 32 requests on the event loop (a stdlib StreamHandler, uvicorn's access
# log included, makes one per request).
BATCH_LINES = 32


class JsonLines:
    """The process's writer of JSON lines.

    `write(item)` queues the line: a log record's dict (its `timestamp` an epoch float), or a
    request's `RequestLine` tuple. Every `BATCH_LINES` lines, the writer turns what is queued into
    JSON and writes it in one call (~25 KB; skipped, never waited for, while the flusher thread is
    writing); the flusher thread does the same every `flush_interval` seconds with whatever is
    queued, so a quiet server's lines are out within that time. An urgent line (warnings, errors,
    5xx requests) is written at once by the caller, with everything before it; so are all lines
    when `flush_interval` is 0. `flush()` and exit write the rest. Building and encoding a batch
    in a tight loop costs a fraction of doing it for each line between two requests' work.
    Queueing never locks (deque append and popleft are atomic); the lock only keeps two flushes
    from interleaving.

    What is queued belongs to the writer: callers hand over objects they no longer change.
    """

    def __init__(self, stream: IO[Any], *, flush_interval: float = 0.1, level: int = logging.INFO):
        self.info = level <= logging.INFO
        self._stream = stream
        self._binary = not isinstance(stream, io.TextIOBase)
        self._interval = flush_interval
        self._pending: deque[dict[str, Any] | RequestLine] = deque()
        self._lock = threading.RLock()  # re-entrant: a signal handler may flush during a flush
        self._timestamp = _Timestamps()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_interval > 0:
            self._thread = threading.Thread(target=self._flush_loop, name="slm-log-flush", daemon=True)
            self._thread.start()

    def write(self, item: dict[str, Any] | RequestLine, urgent: bool = False) -> None:
        pending = self._pending
        pending.append(item)
        if urgent or self._thread is None or len(pending) >= 4096:
            self.flush()
        elif len(pending) >= BATCH_LINES and self._lock.acquire(blocking=False):
            # Never waits: while the flusher thread is writing, the lines stay queued for it.
            try:
                self.flush()
            finally:
                self._lock.release()

    def flush(self) -> None:
        with self._lock:
            pending = self._pending
            if not pending:
                return
            timestamp = self._timestamp
            # One growing buffer, not a list of lines joined: a line (~600 bytes) is past
            # pymalloc's small-object limit, and keeping a batch of them alive until the join cost
            # ~3 µs a line in malloc and cache misses (same-process A/B in bench_server's workers);
            # appended and dropped at once, each line reuses the same memory.
            data = bytearray()
            for _ in range(len(pending)):
                item = pending.popleft()
                doc = item if type(item) is dict else request_doc(item)  # type: ignore[arg-type]
                doc["timestamp"] = timestamp(doc["timestamp"])
                try:
                    data += _encode(doc)
                except (TypeError, orjson.JSONEncodeError) as exc:  # e.g. a dict key that is not a string
                    data += _encode({"timestamp": doc["timestamp"], "level": "error",
                                     "logger": __name__, "message": f"unloggable line: {exc}"})  # fmt: skip
            try:
                self._stream.write(data if self._binary else data.decode())
                self._stream.flush()
            except (OSError, ValueError):  # stdout closed or gone: losing log lines must not stop serving
                pass

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    def _flush_loop(self) -> None:
        while not self._closed.wait(self._interval):
            self.flush()


class JsonLinesHandler(logging.Handler):
    """The root handler: each record becomes one line of the process's `JsonLines`."""

    def __init__(self, lines: JsonLines):
        super().__init__()
        self.lines = lines
        self.set_name(_HANDLER_NAME)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.write(record_doc(record), urgent=record.levelno >= logging.WARNING)
        except Exception:  # logging's own contract: never raise from emit
            self.handleError(record)

    def flush(self) -> None:
        self.lines.flush()

    def close(self) -> None:
        global _lines
        if _lines is self.lines:
            _lines = None
        self.lines.close()
        super().close()


_lines: JsonLines | None = None


def request_lines() -> JsonLines | None:
    """The process's JSON lines when `configure_logging` set them up (else None: an embedding
    program's logging gets the request lines through the `slm_server.access` logger)."""
    return _lines


def flush_lines() -> None:
    """Write the buffered lines now (shutdown, exit, a fatal signal)."""
    if _lines is not None:
        _lines.flush()


atexit.register(flush_lines)


def flush_before_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Write the buffered lines when one of `signals` ends the process, then let the signal act as
    it did before. uvicorn restores the handlers it found and re-raises the signal it shut down
    on, which kills the process without running `atexit`; the lines since the last flush (the
    last requests, "Finished server process") would be lost without this."""
    for signum in signals:
        previous = signal.getsignal(signum)

        def handler(received: int, frame: Any, previous: Any = previous) -> None:
            flush_lines()
            signal.signal(received, previous if previous is not None else signal.SIG_DFL)
            signal.raise_signal(received)

        signal.signal(signum, handler)


def configure_logging(settings: Settings, stream: IO[Any] | None = None) -> JsonLinesHandler:
    """Route the root logger, and so uvicorn's, into one JSON-lines writer. Idempotent: a second
    call replaces the first (its buffered lines written). `handler.close()` undoes it."""
    global _lines
    # None of these reach the JSON lines; skipping them is the logging HOWTO's "Optimization"
    # advice (the caller lookup alone walks the whole ASGI call stack on every request line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
            old.close()
    level = logging.getLevelName(settings.log_level.upper())
    if stream is None:
        sys.stdout.flush()
        stream = cast(IO[bytes], getattr(sys.stdout, "buffer", sys.stdout))
    lines = JsonLines(stream, flush_interval=settings.log_flush_interval_seconds, level=level)
    handler = JsonLinesHandler(lines)
    root.addHandler(handler)
    root.setLevel(level)
    _lines = lines
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "fastapi"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # Requests are logged by the server's own middleware, with the model fields; uvicorn's access
    # lines would only repeat them without.
    logging.getLogger("uvicorn.access").disabled = True
    logging.captureWarnings(True)  # Python warnings become JSON lines too (logger py.warnings)
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


class OutputLogPolicy:
    """What of a model output goes into the request's log line: none | hash | truncated | full.

    Hashes are HMAC-SHA256 under `output_hash_key`: a plain sha256 of a short output ("yes", a number,
    a name) is reversed by hashing guesses. Without a key, each process draws its own, and its hashes
    compare only with its own (`key_source` says which, for the model_loaded line)."""

    def __init__(self, settings: Settings):
        self.mode = settings.log_outputs
        self.rate = settings.log_sample_rate
        self.limit = settings.log_truncate_chars
        self._random = random.Random()
        if settings.output_hash_key is not None:
            key = settings.output_hash_key.get_secret_value().encode()
            self.key_source = "hmac-sha256 keyed by SLM_OUTPUT_HASH_KEY"
        else:
            key = os.urandom(32)
            self.key_source = (
                "hmac-sha256 with a random key of this process (SLM_OUTPUT_HASH_KEY unset): hashes are not "
                "comparable across restarts or replicas"
            )
        # Copied per output: the key's inner and outer pads are hashed once, here.
        self._hmac = hmac.new(key, digestmod=hashlib.sha256)

    def fields(self, text: str | None) -> dict[str, Any] | None:
        """The fields of one output, or None when the policy or the sampling leaves it out."""
        if text is None or not self.sampled():
            return None
        return self.describe(text)

    def sampled(self) -> bool:
        """Whether this request's outputs are logged (one draw per request, whatever its choices)."""
        if self.mode == "none":
            return False
        return self.rate >= 1.0 or self._random.random() < self.rate

    def describe(self, text: str) -> dict[str, Any]:
        out: dict[str, Any] = {"gen_ai.output.length": len(text)}
        if self.mode == "hash":
            digest = self._hmac.copy()
            digest.update(text.encode())
            out["gen_ai.output.hmac_sha256"] = digest.hexdigest()
        elif self.mode == "truncated":
            out["gen_ai.output.text"] = text[: self.limit]
            out["gen_ai.output.truncated"] = len(text) > self.limit
        else:
            out["gen_ai.output.text"] = text
        return out


def parse_traceparent(value: str) -> tuple[str | None, str | None]:
    """(trace_id, span_id) of a W3C `traceparent` header, or (None, None) when it is malformed."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None, None
    trace_id, span_id = parts[1].lower(), parts[2].lower()
    if len(trace_id) != 32 or len(span_id) != 16:
        return None, None
    try:
        int(trace_id, 16)
        int(span_id, 16)
    except ValueError:
        return None, None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None, None
    return trace_id, span_id
