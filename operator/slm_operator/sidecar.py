"""The monitoring sidecar's container, for every pod whose runtime is not the built-in server: a pure function,
plain types in, a Kubernetes container (a plain dict) out.

In such a pod the runtime (slm_operator.runtimes) listens on `RUNTIME_PORT` and the sidecar on the pod's
`http` port (`SIDECAR_PORT`, the built-in server's port): the Service and the ServiceMonitor keep targeting
`http`, so clients and Prometheus reach the sidecar, which forwards to the runtime on loopback and serves the
`slm_*` series on its own /metrics. The runtime's own series (vllm:*, llamacpp:*, …) stay on the runtime's
port, named `RUNTIME_PORT_NAME`, for a second scrape endpoint (`scrape_endpoints`); its container port must
not be named `http`.

Probes: liveness and startup ask the sidecar itself (/healthz), so a runtime that takes minutes to load its
model never gets the sidecar restarted; readiness asks the runtime through the sidecar (/readyz answers what
the runtime's health endpoint answers), so the pod takes traffic once both are up.

Settings are the sidecar's `SLM_*` environment (slm_sidecar.settings); the output-hash key and the admin
token come from Secrets, never as values. Fault injection stays behind the same gate as the built-in
server's: the admin listener on loopback, only with `faults_admin`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slm_operator.spec import SERVER_PORT

DEFAULT_SIDECAR_IMAGE = "ghcr.io/slm-monitoring/slm-sidecar:0.1.0"
SIDECAR_CONTAINER_NAME = "slm-sidecar"
SIDECAR_PORT = SERVER_PORT  # the pod's `http` port: what the Service and the ServiceMonitor target
RUNTIME_PORT = 8080  # where the runtime listens in a pod with the sidecar
RUNTIME_PORT_NAME = "runtime"
ADMIN_PORT = 8001  # the sidecar's admin listener (fault injection), on loopback
# Each runtime's readiness endpoint (what its own readiness probe reads; slm_operator.runtimes).
HEALTH_PATHS = {"vllm": "/health", "sglang": "/health", "tgi": "/health", "llamacpp": "/health"}
DEFAULT_RESOURCES: dict[str, Any] = {
    # 79-84 MiB resident, at most 100 MiB after the drift detector ran (no scipy; docs/sidecar.md).
    # No CPU limit: throttling would add its latency to every token of every stream.
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "256Mi"},
}
_OUTPUT_POLICIES = ("none", "hash", "truncated", "full")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class SidecarError(ValueError):
    """Parameters the sidecar cannot run with; the message names the culprit."""


def render_sidecar(
    *,
    runtime: str,
    served_model_name: str,
    model: str = "",
    image: str = DEFAULT_SIDECAR_IMAGE,
    image_pull_policy: str | None = None,
    runtime_port: int = RUNTIME_PORT,
    port: int = SIDECAR_PORT,
    request_timeout_seconds: float = 60.0,
    log_level: str = "info",
    log_outputs: str = "hash",
    log_sample_rate: float = 1.0,
    output_hash_key: Mapping[str, str] | None = None,
    faults_admin: bool = False,
    admin_token: Mapping[str, str] | None = None,
    resources: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The sidecar container of a pod serving `served_model_name` with `runtime` on `runtime_port`.

    `output_hash_key` / `admin_token`: Secret key references, `{"name": <secret>, "key": <key>}`.
    Raises SidecarError for a runtime it does not front, clashing ports or an unknown logging policy.
    """
    if runtime not in HEALTH_PATHS:
        raise SidecarError(f"the sidecar fronts {', '.join(HEALTH_PATHS)}; not {runtime!r} (builtin has its own)")
    if not served_model_name:
        raise SidecarError("a served model name is required: it is the `model` label of every slm_* series")
    for name, value in (("port", port), ("runtime_port", runtime_port)):
        if not 0 < value < 65536:
            raise SidecarError(f"{name} {value} is out of range")
    if len({port, runtime_port, ADMIN_PORT}) != 3:
        raise SidecarError(
            f"the sidecar's port ({port}), the runtime's ({runtime_port}) and the admin listener's ({ADMIN_PORT}) "
            "must differ: they share the pod's network"
        )
    if log_outputs not in _OUTPUT_POLICIES:
        raise SidecarError(f"log_outputs {log_outputs!r} is not one of {', '.join(_OUTPUT_POLICIES)}")
    if log_level not in _LOG_LEVELS:
        raise SidecarError(f"log_level {log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    if not 0.0 <= log_sample_rate <= 1.0:
        raise SidecarError(f"log_sample_rate {log_sample_rate} is not between 0 and 1")
    if request_timeout_seconds <= 0:
        raise SidecarError(f"request_timeout_seconds must be > 0, got {request_timeout_seconds}")
    pairs: list[tuple[str, Any]] = [
        ("SLM_UPSTREAM_URL", f"http://127.0.0.1:{runtime_port}"),
        ("SLM_UPSTREAM_HEALTH_PATH", HEALTH_PATHS[runtime]),
        ("SLM_RUNTIME", runtime),
        ("SLM_MODEL_NAME", served_model_name),
        ("SLM_MODEL", model),
        ("SLM_HOST", "0.0.0.0"),  # noqa: S104 - the pod's own address: the Service reaches it there
        ("SLM_PORT", port),
        ("SLM_REQUEST_TIMEOUT_SECONDS", request_timeout_seconds),
        ("SLM_LOG_LEVEL", log_level),
        ("SLM_LOG_OUTPUTS", log_outputs),
        ("SLM_LOG_SAMPLE_RATE", float(log_sample_rate)),
        ("SLM_FAULTS_ADMIN", faults_admin),
        ("SLM_ADMIN_HOST", "127.0.0.1"),
        ("SLM_ADMIN_PORT", ADMIN_PORT),
    ]
    env: list[dict[str, Any]] = [{"name": name, "value": _text(value)} for name, value in pairs]
    for name, ref in (("SLM_OUTPUT_HASH_KEY", output_hash_key), ("SLM_ADMIN_TOKEN", admin_token)):
        if ref is not None:
            if not ref.get("name") or not ref.get("key"):
                raise SidecarError(f"{name}: a Secret reference needs `name` and `key`, got {dict(ref)}")
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}})
    container: dict[str, Any] = {
        "name": SIDECAR_CONTAINER_NAME,
        "image": image,
        "args": [],  # every setting is in the environment; the image's entry point is `slm-sidecar`
        "env": env,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": dict(resources) if resources is not None else DEFAULT_RESOURCES,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "startupProbe": _probe("/healthz", period=2, failures=30),
        "livenessProbe": _probe("/healthz", period=10, failures=3),
        "readinessProbe": _probe("/readyz", period=5, failures=3),
    }
    if image_pull_policy:
        container["imagePullPolicy"] = image_pull_policy
    return container


def scrape_endpoints(runtime_port: int = RUNTIME_PORT) -> list[dict[str, Any]]:
    """What Prometheus scrapes in such a pod: the sidecar's slm_* series on `http`, the runtime's own on its
    port (`RUNTIME_PORT_NAME`; the Service must list it for a ServiceMonitor to reach it)."""
    return [
        {"port": "http", "path": "/metrics", "targetPort": SIDECAR_PORT},
        {"port": RUNTIME_PORT_NAME, "path": "/metrics", "targetPort": runtime_port},
    ]


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
