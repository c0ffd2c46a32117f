"""/admin/faults — change fault injection at run time (alert tests, the demo).

Mounted only when the server was started with fault injection opted in (SLM_FAULTS_ADMIN=true, or
SLM_FAULT_INJECTION=true with SLM_FAULT_ADMIN_API=true); in the default configuration the route
does not exist, so no request can turn faults on.

    POST /admin/faults {"errorRate": 0.5, "addedLatencySeconds": 2, "degradedOutput": true}
    PUT  /admin/faults {"error_rate": 0.5, "latency_seconds": 2, "degraded_rate": 1.0}   (same, finer)
    GET  /admin/faults
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from slm_server.routers.common import service_of

router = APIRouter(tags=["admin"])


class FaultSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of generations failing with 500.")
    latency_seconds: float = Field(0.0, ge=0.0, le=600.0, description="Added to every generation.")
    degraded_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of generations sampled uniformly.")


class FaultSwitches(BaseModel):
    """The operator/demo contract: camelCase, degraded output on or off."""

    model_config = ConfigDict(extra="forbid")

    errorRate: float = Field(0.0, ge=0.0, le=1.0)  # the contract spells them in camelCase
    addedLatencySeconds: float = Field(0.0, ge=0.0, le=600.0)
    degradedOutput: bool = False


def _current(request: Request) -> FaultSettings:
    f = service_of(request).faults
    return FaultSettings(error_rate=f.error_rate, latency_seconds=f.latency_seconds, degraded_rate=f.degraded_rate)


def _apply(request: Request, body: FaultSettings) -> FaultSettings:
    f = service_of(request).faults
    f.error_rate, f.latency_seconds, f.degraded_rate = body.error_rate, body.latency_seconds, body.degraded_rate
    return _current(request)


@router.get("/admin/faults", response_model=FaultSettings)
async def get_faults(request: Request) -> FaultSettings:
    return _current(request)


@router.put("/admin/faults", response_model=FaultSettings)
async def put_faults(body: FaultSettings, request: Request) -> FaultSettings:
    return _apply(request, body)


@router.post("/admin/faults", response_model=FaultSettings)
async def post_faults(body: FaultSwitches, request: Request) -> FaultSettings:
    settings = FaultSettings(
        error_rate=body.errorRate,
        latency_seconds=body.addedLatencySeconds,
        degraded_rate=1.0 if body.degradedOutput else 0.0,
    )
    return _apply(request, settings)
