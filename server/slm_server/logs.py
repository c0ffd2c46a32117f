"""JSON-lines logging: stdlib `logging` with one JSON formatter, uvicorn's loggers routed into it.

Every line is one JSON object: `timestamp` (RFC 3339, UTC), `level`, `logger`, `message`, plus the
record's `fields` (passed as `extra={"fields": {...}}`). Field names follow the OpenTelemetry
semantic conventions where one exists (`http.route`, `http.response.status_code`,
`gen_ai.request.model`, `gen_ai.usage.input_tokens`, `gen_ai.response.finish_reasons`,
`exception.stacktrace`, `trace_id`, …) and carry an `slm.` prefix where none does.

Events (the `event` field): request, startup, model_loaded, model_load_failed, gpu_found,
gpu_missing, overloaded, shutdown, error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import time
import traceback
from typing import Any, TextIO

from slm_server.settings import Settings

_HANDLER_NAME = "slm_server.json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record. Cheap on purpose: it runs once per API request."""

    def __init__(self) -> None:
        super().__init__()
        self._encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": self._timestamp(record.created),
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
        return self._encode(doc)


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger, and so uvicorn's, into one JSON handler. Idempotent."""
    # None of these reach the JSON lines; skipping them is the logging HOWTO's "Optimization"
    # advice (the caller lookup alone walks the whole ASGI call stack on every request line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
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
    """What of a model output goes into the request's log line: none | hash | truncated | full."""

    def __init__(self, settings: Settings):
        self.mode = settings.log_outputs
        self.rate = settings.log_sample_rate
        self.limit = settings.log_truncate_chars
        self._random = random.Random()

    def fields(self, text: str | None) -> dict[str, Any] | None:
        if text is None or self.mode == "none":
            return None
        if self.rate < 1.0 and self._random.random() >= self.rate:
            return None
        out: dict[str, Any] = {"gen_ai.output.length": len(text)}
        if self.mode == "hash":
            out["gen_ai.output.sha256"] = hashlib.sha256(text.encode()).hexdigest()
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
