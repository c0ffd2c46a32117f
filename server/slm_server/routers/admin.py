"""/admin/faults — change fault injection at run time (alert tests, the demo).

Served only by the admin listener (slm_server.admin), never on the serving port, and only when the
server was started with the admin API opted in (SLM_FAULTS_ADMIN=true, or SLM_FAULT_INJECTION=true
with SLM_FAULT_ADMIN_API=true). With SLM_ADMIN_TOKEN set, every request needs
`Authorization: Bearer <token>`; others get 401.

    POST /admin/faults {"errorRate": 0.5, "addedLatencySeconds": 2, "degradedOutput": true}
    PUT  /admin/faults {"error_rate": 0.5, "latency_seconds": 2, "degraded_rate": 1.0}   (same, finer)
    GET  /admin/faults
"""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from slm_server.errors import Unauthorized
from slm_server.routers.common import service_of

log = logging.getLogger("slm_server.admin")


def require_token(request: Request) -> None:
    """401 unless the request carries the admin token (when one is set)."""
    token = request.app.state.settings.admin_token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode()):
        raise Unauthorized(
            "the admin API needs `Authorization: Bearer <token>`, the token the server was given in SLM_ADMIN_TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(tags=["admin"], dependencies=[Depends(require_token)])


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
    current = _current(request)
    log.warning(
        "fault injection changed",
        extra={"fields": {"event": "faults_changed", **{f"slm.fault.{k}": v for k, v in current.model_dump().items()}}},
    )
    return current


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
