"""PUT /admin/faults — change fault injection at run time (alert tests, the demo).

Mounted only when the server was started with SLM_FAULT_INJECTION=true and SLM_FAULT_ADMIN_API=true;
in the default configuration the route does not exist, so no request can turn faults on.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from slm_server.routers.common import service_of

router = APIRouter(tags=["admin"])


class FaultSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(0.0, ge=0.0, le=1.0)
    latency_seconds: float = Field(0.0, ge=0.0, le=600.0)
    degraded_rate: float = Field(0.0, ge=0.0, le=1.0)


@router.get("/admin/faults", response_model=FaultSettings)
async def get_faults(request: Request) -> FaultSettings:
    f = service_of(request).faults
    return FaultSettings(error_rate=f.error_rate, latency_seconds=f.latency_seconds, degraded_rate=f.degraded_rate)


@router.put("/admin/faults", response_model=FaultSettings)
async def put_faults(body: FaultSettings, request: Request) -> FaultSettings:
    f = service_of(request).faults
    f.error_rate, f.latency_seconds, f.degraded_rate = body.error_rate, body.latency_seconds, body.degraded_rate
    return body
