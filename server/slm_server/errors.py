"""Domain exceptions, mapped to HTTP responses in one place (`install_error_handlers`).

Bodies follow the OpenAI error shape, `{"error": {"message", "type", "param", "code"}}`, on every
route, so the official clients surface the message.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slm_server.protocol import NotText

log = logging.getLogger("slm_server.errors")


class ServerError(Exception):
    """Base of the errors a request can end in. `status`, `type` and `error_kind` are per class."""

    status = 500
    type = "server_error"
    error_kind = "internal"  # the closed set of slm_request_errors_total{error}
    counted = False  # True once the service has counted it (errors of a running generation)

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidInput(ServerError):
    status = 400
    type = "invalid_request_error"
    error_kind = "invalid_input"


class Unauthorized(ServerError):
    status = 401
    type = "authentication_error"
    error_kind = "invalid_input"


class ClientDisconnected(ServerError):
    """The client went away before its response: nothing is sent, and its generation stopped. 499, as
    nginx logs it; not an error of the server's (its generation ends as `abort`)."""

    status = 499
    type = "client_closed_request"
    error_kind = "invalid_input"
    counted = True  # the generation's accounting records the abort; no error is counted


class ModelNotFound(ServerError):
    status = 404
    type = "not_found_error"
    error_kind = "invalid_input"


class Overloaded(ServerError):
    status = 429
    type = "rate_limit_error"
    error_kind = "overloaded"


class ModelNotReady(ServerError):
    status = 503
    type = "service_unavailable"
    error_kind = "not_ready"


class RequestTimeout(ServerError):
    status = 504
    type = "timeout_error"
    error_kind = "timeout"


class ModelFailure(ServerError):
    status = 500
    type = "server_error"
    error_kind = "model_error"


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    for err in exc.errors():  # a string that is not text says so alone, where it is (slm_server.protocol)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, NotText):
            return str(cause), cause.path
    parts, first_field = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        first_field = first_field or field
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first_field


def _count(request: Request, kind: str) -> None:
    """Count a refusal of a generation request in slm_request_errors_total (before any job ran)."""
    metrics = getattr(request.app.state, "metrics", None)
    generation = getattr(metrics, "generation", None) or {}
    bound = generation.get(request.scope["path"])
    if bound is not None:
        bound.error(kind)


def _body_error(exc: StarletteHTTPException) -> str:
    """The message of an HTTP error; FastAPI's 400 for a body it could not parse says why."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8: byte 0x{cause.object[cause.start]:02x} at {cause.start}"
    if isinstance(cause, RecursionError):
        return "the request body's JSON nests too deeply"
    return str(exc.detail)


def install_error_handlers(app: FastAPI) -> None:
    async def on_server_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServerError)
        if not exc.counted:
            _count(request, exc.error_kind)
        return JSONResponse(
            error_body(exc.status, exc.message, exc.type, exc.param), status_code=exc.status, headers=exc.headers
        )

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        _count(request, "invalid_input")
        message, field = _validation_message(exc)
        body = error_body(422, message, "invalid_request_error", field)
        body["detail"] = [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in exc.errors()]
        return JSONResponse(body, status_code=422)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if 400 <= exc.status_code < 500:
            _count(request, "invalid_input")
        return JSONResponse(
            error_body(exc.status_code, _body_error(exc), "invalid_request_error"),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Last resort: the request fails, the process lives, the stack trace is logged once.
        _count(request, "internal")
        record = request.scope.get("state", {}).get("slm_record")
        request_id = record.request_id if record is not None else None
        log.error("unhandled error", exc_info=exc, extra={"fields": {"event": "error", "request_id": request_id}})
        return JSONResponse(error_body(500, "internal server error", "server_error"), status_code=500)

    app.add_exception_handler(ServerError, on_server_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
