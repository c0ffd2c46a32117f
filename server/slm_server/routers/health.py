"""Liveness, readiness, and the model list."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from slm_server.protocol import ModelCard, ModelList
from slm_server.routers.common import service_of

router = APIRouter()


@router.get("/healthz", tags=["health"])
async def healthz(request: Request) -> JSONResponse:
    """Liveness: 200 while the process can serve; 503 once the model failed to load (restart me)."""
    service = service_of(request)
    if service.load_error:
        return JSONResponse({"status": "failed", "error": service.load_error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 503 until the model is loaded, and again while shutting down."""
    service = service_of(request)
    if not service.ready:
        return JSONResponse(
            {"status": "loading" if not service.load_error else "failed"}, status_code=503, headers={"Retry-After": "5"}
        )
    return JSONResponse({"status": "ready", "model": service.model_name})


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def list_models(request: Request) -> ModelList:
    """The one model this server serves, with its context length."""
    service = service_of(request)
    service.check_ready()
    return ModelList(
        data=[
            ModelCard(
                id=service.model_name, created=request.app.state.started, max_model_len=service.engine.info.max_context
            )
        ]
    )
