"""Operator settings, read once from the environment (and the CLI flags that set the same variables)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from slm_operator.render import default_runtime_images
from slm_operator.sidecar import DEFAULT_SIDECAR_IMAGE

DEFAULT_SERVER_IMAGE = "ghcr.io/slm-monitoring/slm-server:0.1.0"
# The environment variable that overrides the default image of each third-party runtime (keys of
# RenderContext.runtime_images; the chart sets them from operator.runtimeImages).
RUNTIME_IMAGE_ENV = {
    "vllm": "SLM_OPERATOR_VLLM_IMAGE",
    "sglang": "SLM_OPERATOR_SGLANG_IMAGE",
    "tgi": "SLM_OPERATOR_TGI_IMAGE",
    "llamacpp": "SLM_OPERATOR_LLAMACPP_IMAGE",
    "llamacpp-gpu": "SLM_OPERATOR_LLAMACPP_GPU_IMAGE",
}


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw else default


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw else default


def _bool(name: str) -> bool:
    """Off unless set to one of the usual words for yes (the gates below default to off)."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={raw!r}: expected true or false")


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Every knob of the operator, with its environment variable.

    server_image: SLM_OPERATOR_SERVER_IMAGE — image of the serving pods of runtime builtin when spec.image is empty.
    runtime_images: SLM_OPERATOR_{VLLM,SGLANG,TGI,LLAMACPP,LLAMACPP_GPU}_IMAGE — image of each third-party runtime
        when spec.image is empty (llamacpp-gpu: llama.cpp in pods with GPUs); default the pinned upstream images.
    sidecar_image: SLM_OPERATOR_SIDECAR_IMAGE — the monitoring sidecar's image in third-party runtimes' pods.
    log_format: SLM_OPERATOR_LOG_FORMAT — json (default), plain or full.
    resync_seconds: SLM_OPERATOR_RESYNC_SECONDS — period of the full resync of every SLMDeployment
        (drift repair, Prometheus Operator CRD detection, status refresh).
    discovery_ttl_seconds: SLM_OPERATOR_DISCOVERY_TTL_SECONDS — how long API discovery, node capacity and
        Prometheus selectors are cached between reconciles.
    workers: SLM_OPERATOR_WORKERS — threads that run reconciles (the kubernetes client is synchronous).
    metrics_port: SLM_OPERATOR_METRICS_PORT — the operator's own /metrics (prometheus-client).
    health_port: SLM_OPERATOR_HEALTH_PORT — kopf's liveness endpoint /healthz.
    bind_host: SLM_OPERATOR_BIND_HOST — address both endpoints listen on (tests use 127.0.0.1).
    watch_server_timeout / watch_client_timeout: SLM_OPERATOR_WATCH_{SERVER,CLIENT}_TIMEOUT — see main.startup.
    field_manager: the server-side-apply field manager, also `app.kubernetes.io/managed-by`.
    allow_fault_injection: SLM_OPERATOR_ALLOW_FAULT_INJECTION — whether spec.server.faultsAdmin may switch
        the server's fault injection on (chart value operator.allowFaultInjection; default off).
    allow_full_output_logging: SLM_OPERATOR_ALLOW_FULL_OUTPUT_LOGGING — whether spec.logging.outputs may be
        `full` (chart value operator.allowFullOutputLogging; default off: `full` is logged as `hash`).
    namespaces: the namespaces watched (`--namespace`, repeatable); empty: every namespace.
    """

    server_image: str = DEFAULT_SERVER_IMAGE
    runtime_images: Mapping[str, str] = dataclasses.field(default_factory=default_runtime_images)
    sidecar_image: str = DEFAULT_SIDECAR_IMAGE
    log_format: str = "json"
    resync_seconds: float = 30.0
    discovery_ttl_seconds: float = 10.0
    workers: int = 16
    metrics_port: int = 9090
    health_port: int = 8080
    bind_host: str = "0.0.0.0"  # noqa: S104 - in a pod, the kubelet and Prometheus reach the pod IP
    watch_server_timeout: int = 300
    watch_client_timeout: int = 330
    field_manager: str = "slm-operator"
    allow_fault_injection: bool = False
    allow_full_output_logging: bool = False
    namespaces: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> OperatorConfig:
        return cls(
            server_image=os.environ.get("SLM_OPERATOR_SERVER_IMAGE") or DEFAULT_SERVER_IMAGE,
            runtime_images={key: os.environ.get(RUNTIME_IMAGE_ENV[key]) or image
                            for key, image in default_runtime_images().items()},
            sidecar_image=os.environ.get("SLM_OPERATOR_SIDECAR_IMAGE") or DEFAULT_SIDECAR_IMAGE,
            log_format=os.environ.get("SLM_OPERATOR_LOG_FORMAT") or "json",
            resync_seconds=_float("SLM_OPERATOR_RESYNC_SECONDS", 30.0),
            discovery_ttl_seconds=_float("SLM_OPERATOR_DISCOVERY_TTL_SECONDS", 10.0),
            workers=_int("SLM_OPERATOR_WORKERS", 16),
            metrics_port=_int("SLM_OPERATOR_METRICS_PORT", 9090),
            health_port=_int("SLM_OPERATOR_HEALTH_PORT", 8080),
            bind_host=os.environ.get("SLM_OPERATOR_BIND_HOST") or "0.0.0.0",  # noqa: S104
            watch_server_timeout=_int("SLM_OPERATOR_WATCH_SERVER_TIMEOUT", 300),
            watch_client_timeout=_int("SLM_OPERATOR_WATCH_CLIENT_TIMEOUT", 330),
            allow_fault_injection=_bool("SLM_OPERATOR_ALLOW_FAULT_INJECTION"),
            allow_full_output_logging=_bool("SLM_OPERATOR_ALLOW_FULL_OUTPUT_LOGGING"),
        )
