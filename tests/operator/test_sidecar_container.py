"""The monitoring sidecar's container (slm_operator.sidecar): a valid container under restricted Pod
Security, whose environment the sidecar itself reads as meant, whose probes and port answer on the real
sidecar app, and that refuses parameters it cannot run with."""

from __future__ import annotations

from typing import Any

import httpx
import kubernetes_validate
import pytest
from starlette.testclient import TestClient

from slm_operator.sidecar import (
    ADMIN_PORT,
    DEFAULT_RESOURCES,
    HEALTH_PATHS,
    RUNTIME_PORT,
    RUNTIME_PORT_NAME,
    SidecarError,
    render_sidecar,
    scrape_endpoints,
)
from slm_operator.spec import SERVER_PORT
from slm_sidecar.app import create_app
from slm_sidecar.settings import SidecarSettings

SECRET = {"name": "phi-secrets", "key": "output-hash-key"}


def pod(*containers: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "phi-0", "namespace": "llm"},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": list(containers),
        },
    }


RUNTIME = {
    "name": "runtime",
    "image": "docker.io/vllm/vllm-openai:v0.34.0",
    "ports": [{"name": RUNTIME_PORT_NAME, "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
}


def settings_of(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch, secrets: dict[str, str]) -> SidecarSettings:
    """The sidecar's settings as it reads them from this container's environment (Secrets resolved)."""
    for entry in container["env"]:
        if "value" in entry:
            monkeypatch.setenv(entry["name"], entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            monkeypatch.setenv(entry["name"], secrets[f"{ref['name']}/{ref['key']}"])
    return SidecarSettings()  # type: ignore[call-arg]


@pytest.mark.parametrize("runtime", sorted(HEALTH_PATHS))
def test_the_container_is_valid_beside_the_runtime(runtime: str):
    container = render_sidecar(runtime=runtime, served_model_name="phi")
    kubernetes_validate.validate(pod(container, RUNTIME), "1.33", strict=True)
    assert container["ports"] == [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    assert container["resources"] == DEFAULT_RESOURCES
    assert "limits" in container["resources"] and "cpu" not in container["resources"]["limits"]


def test_restricted_pod_security():
    security = render_sidecar(runtime="vllm", served_model_name="phi")["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["readOnlyRootFilesystem"] is True


def test_the_sidecar_reads_its_environment_as_meant(monkeypatch: pytest.MonkeyPatch):
    container = render_sidecar(
        runtime="llamacpp",
        served_model_name="phi",
        model="microsoft/Phi-3-mini-4k-instruct",
        log_outputs="truncated",
        log_sample_rate=0.25,
        request_timeout_seconds=120,
        output_hash_key=SECRET,
    )
    # No secret as a value: only references.
    assert {"name": "SLM_OUTPUT_HASH_KEY", "valueFrom": {"secretKeyRef": SECRET}} in container["env"]
    settings = settings_of(container, monkeypatch, {"phi-secrets/output-hash-key": "k3y"})
    assert settings.upstream_url == f"http://127.0.0.1:{RUNTIME_PORT}"
    assert settings.upstream_health_path == "/health"
    assert settings.runtime == "llamacpp"
    assert settings.model_name == "phi"
    assert settings.port == SERVER_PORT
    assert settings.host == "0.0.0.0"  # noqa: S104
    assert settings.log_outputs == "truncated"
    assert settings.log_sample_rate == 0.25
    assert settings.request_timeout_seconds == 120
    assert settings.output_hash_key is not None and settings.output_hash_key.get_secret_value() == "k3y"
    assert settings.fault_injection is False and settings.fault_admin_api is False


def test_fault_injection_is_behind_the_servers_gate(monkeypatch: pytest.MonkeyPatch):
    container = render_sidecar(
        runtime="vllm", served_model_name="phi", faults_admin=True, admin_token={"name": "admin", "key": "token"}
    )
    settings = settings_of(container, monkeypatch, {"admin/token": "t0ken"})
    assert settings.fault_admin_api is True and settings.fault_injection is True
    assert settings.admin_host == "127.0.0.1"  # reachable from inside the pod only
    assert settings.admin_port == ADMIN_PORT
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "t0ken"
    assert all(port["containerPort"] != ADMIN_PORT for port in container["ports"])  # never exposed


def test_the_probes_answer_on_the_sidecar(monkeypatch: pytest.MonkeyPatch):
    """Liveness asks the sidecar; readiness follows the runtime's health endpoint, the one rendered."""
    container = render_sidecar(runtime="sglang", served_model_name="phi")
    settings = settings_of(container, monkeypatch, {})
    runtime_ready = False
    asked: list[str] = []

    def runtime(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.url.host}:{request.url.port}{request.url.path}")
        return httpx.Response(200 if runtime_ready else 503, json={})

    app = create_app(settings, transport=httpx.MockTransport(runtime))
    probes = {name: container[name]["httpGet"]["path"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    with TestClient(app) as client:
        assert client.get(probes["livenessProbe"]).status_code == 200
        assert client.get(probes["startupProbe"]).status_code == 200
        assert client.get(probes["readinessProbe"]).status_code == 503  # the runtime still loads
        runtime_ready = True
        assert client.get(probes["readinessProbe"]).status_code == 200
        assert client.get("/metrics").status_code == 200  # the `http` endpoint of scrape_endpoints
    assert asked[0] == f"127.0.0.1:{RUNTIME_PORT}/health"


def test_scrape_endpoints_name_the_sidecar_and_the_runtime():
    assert scrape_endpoints() == [
        {"port": "http", "path": "/metrics", "targetPort": SERVER_PORT},
        {"port": RUNTIME_PORT_NAME, "path": "/metrics", "targetPort": RUNTIME_PORT},
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"runtime": "builtin"}, "not 'builtin'"),
        ({"served_model_name": ""}, "served model name"),
        ({"runtime_port": SERVER_PORT}, "must differ"),
        ({"port": ADMIN_PORT}, "must differ"),
        ({"port": 70000}, "out of range"),
        ({"log_outputs": "everything"}, "log_outputs"),
        ({"log_level": "loud"}, "log_level"),
        ({"log_sample_rate": 2.0}, "log_sample_rate"),
        ({"request_timeout_seconds": 0}, "request_timeout_seconds"),
        ({"output_hash_key": {"name": "s"}}, "SLM_OUTPUT_HASH_KEY"),
    ],
)
def test_parameters_it_cannot_run_with_are_refused(overrides: dict[str, Any], message: str):
    with pytest.raises(SidecarError, match=message):
        render_sidecar(**{"runtime": "vllm", "served_model_name": "phi", **overrides})
