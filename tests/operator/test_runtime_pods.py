"""SLMDeployments of a third-party runtime (spec.runtime vllm, sglang, tgi, llamacpp) render pods with the
runtime's container and the monitoring sidecar in front of it, through render.desired_children — what the
reconcile applies. Expected values are written out here; the runtimes' own parsers judge the flags in
tests/runtimes, the API server judges the objects in tests/e2e/test_runtimes.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from slm_operator import render
from slm_operator.render import RenderContext
from slm_operator.spec import Parent, parse_spec

UID = "00000000-0000-4000-8000-000000000001"
CONTEXT = RenderContext(server_image="registry.example/slm-server:1.0",
                        runtime_images={"vllm": "mirror.example/vllm:1", "sglang": "mirror.example/sglang:1",
                                        "tgi": "mirror.example/tgi:1", "llamacpp": "mirror.example/llama:cpu",
                                        "llamacpp-gpu": "mirror.example/llama:cuda"},
                        sidecar_image="mirror.example/slm-sidecar:1")
ANY = "0.0.0.0"  # noqa: S104 - the address the runtimes are told to listen on inside the pod
RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def rendered(spec: dict[str, Any], context: RenderContext = CONTEXT) -> dict[str, dict[str, Any]]:
    children = render.desired_children(Parent("m", "ns", UID), parse_spec({"model": {"name": "org/m"}, **spec}),
                                       context)
    return {c["kind"]: c for c in children}


def containers(children: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in children["Deployment"]["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "tgi", "llamacpp"])
def test_the_pod_runs_the_runtime_behind_the_sidecar_both_restricted(runtime: str) -> None:
    pod = rendered({"runtime": runtime, "resources": {"gpus": 0}})
    by_name = containers(pod)
    assert list(by_name) == [runtime, "slm-sidecar"]
    runtime_c, sidecar_c = by_name[runtime], by_name["slm-sidecar"]
    assert runtime_c["securityContext"] == RESTRICTED
    assert {k: sidecar_c["securityContext"][k] for k in RESTRICTED} == RESTRICTED
    assert pod["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # The sidecar owns the pod's `http` port, which the Service targets; the runtime listens on `runtime`.
    assert sidecar_c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert runtime_c["ports"][0] == {"name": "runtime", "containerPort": 8080, "protocol": "TCP"}
    assert "--port" in runtime_c["args"] and runtime_c["args"][runtime_c["args"].index("--port") + 1] == "8080"
    sidecar_env = {e["name"]: e.get("value") for e in sidecar_c["env"]}
    assert sidecar_env["SLM_UPSTREAM_URL"] == "http://127.0.0.1:8080" and sidecar_env["SLM_RUNTIME"] == runtime
    assert sidecar_c["image"] == "mirror.example/slm-sidecar:1"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert runtime_c[kind]["httpGet"] == {"path": "/health", "port": "runtime"}
    assert runtime_c["startupProbe"]["periodSeconds"] * runtime_c["startupProbe"]["failureThreshold"] >= 600


def test_images_come_from_the_operator_unless_the_spec_names_one() -> None:
    assert containers(rendered({"runtime": "vllm"}))["vllm"]["image"] == "mirror.example/vllm:1"
    assert containers(rendered({"runtime": "tgi"}))["tgi"]["image"] == "mirror.example/tgi:1"
    assert containers(rendered({"runtime": "llamacpp", "resources": {"gpus": 0}}))["llamacpp"]["image"] == (
        "mirror.example/llama:cpu")
    assert containers(rendered({"runtime": "llamacpp", "resources": {"gpus": 2}}))["llamacpp"]["image"] == (
        "mirror.example/llama:cuda")
    own = containers(rendered({"runtime": "sglang", "image": "me.example/sglang:patched"}))
    assert own["sglang"]["image"] == "me.example/sglang:patched"
    assert own["slm-sidecar"]["image"] == "mirror.example/slm-sidecar:1"  # spec.image is the runtime's only
    # Without operator settings: upstream's pinned release images.
    defaults = containers(rendered({"runtime": "vllm"}, RenderContext(server_image="x")))
    assert defaults["vllm"]["image"] == "docker.io/vllm/vllm-openai:v0.34.0"


def test_flags_come_from_the_spec() -> None:
    spec = {"runtime": "vllm", "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "abc123",
                                         "dtype": "bfloat16", "servedName": "qwen", "contextLength": 2048},
            "resources": {"gpus": 2}, "runtimeArgs": ["--max-num-seqs", "32"]}
    vllm = containers(rendered(spec))["vllm"]
    assert vllm["command"] == ["vllm", "serve"]
    assert vllm["args"] == ["Qwen/Qwen2.5-0.5B-Instruct", "--host", ANY, "--port", "8080",
                            "--served-model-name", "qwen", "--revision", "abc123", "--dtype", "bfloat16",
                            "--max-model-len", "2048", "--tensor-parallel-size", "2", "--max-num-seqs", "32"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "2"
    llama = containers(rendered({"runtime": "llamacpp", "resources": {"gpus": 0},
                                 "model": {"name": "tiny", "file": "gguf/tiny-f32.gguf",
                                           "source": {"pvc": {"claimName": "models", "subPath": "tiny"}}}}))
    assert llama["llamacpp"]["args"][:2] == ["--model", "/data/gguf/tiny-f32.gguf"]
    assert "--metrics" in llama["llamacpp"]["args"]


def test_shm_where_the_runtime_needs_it_and_the_hf_token_by_reference() -> None:
    spec = {"runtime": "sglang", "resources": {"shmSizeLimit": "4Gi"},
            "model": {"name": "org/gated", "hfTokenSecretRef": {"name": "hf", "key": "token"}}}
    pod = rendered(spec)
    sglang = containers(pod)["sglang"]
    volumes = {v["name"]: v for v in pod["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"] == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}}
    assert {"name": "shm", "mountPath": "/dev/shm"} in sglang["volumeMounts"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in sglang["env"]
    assert not any(e.get("value") == "hf" for e in sglang["env"])
    # llama.cpp is one process: no shared-memory volume.
    llama = rendered({"runtime": "llamacpp", "resources": {"gpus": 0}})
    assert "shm" not in {v["name"] for v in llama["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    # The built-in server gets the token too (it downloads from the hub as well).
    builtin = rendered({"model": {"name": "org/gated", "hfTokenSecretRef": {"name": "hf", "key": "token"}}})
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in (
        containers(builtin)["server"]["env"])


def test_prometheus_scrapes_the_sidecar_and_the_runtimes_own_metrics() -> None:
    pod = rendered({"runtime": "vllm"})
    assert [(p["name"], p["port"], p["targetPort"]) for p in pod["Service"]["spec"]["ports"]] == [
        ("http", 8000, "http"), ("runtime", 8080, "runtime")]
    endpoints = pod["ServiceMonitor"]["spec"]["endpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("http", "/metrics"), ("runtime", "/metrics")]
    assert all({"action": "labeldrop", "regex": "endpoint"} in e["relabelings"] for e in endpoints)
    clients, scrapers = pod["NetworkPolicy"]["spec"]["ingress"]
    assert clients["ports"] == [{"port": "http", "protocol": "TCP"}]  # clients reach the sidecar only
    assert scrapers["ports"] == [{"port": "http", "protocol": "TCP"}, {"port": "runtime", "protocol": "TCP"}]
    builtin = rendered({})
    assert [p["name"] for p in builtin["Service"]["spec"]["ports"]] == ["http"]
    assert [e["port"] for e in builtin["ServiceMonitor"]["spec"]["endpoints"]] == ["http"]


def test_the_prometheus_rule_holds_the_alerts_the_runtime_can_fire() -> None:
    def alerts(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
        groups = rendered(spec)["PrometheusRule"]["spec"]["groups"]
        return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}

    vllm = alerts({"runtime": "vllm", "monitoring": {"alerts": {
        "kvCacheSaturation": {"thresholdPercent": 80, "for": "2m", "severity": "critical"},
        "requestPreemptions": {"thresholdPerSecond": 0.5}}}})
    assert vllm["SLMKVCacheSaturated"]["expr"] == 'slm:kv_cache_usage:percent{namespace="ns",job="m"} > 80'
    assert (vllm["SLMKVCacheSaturated"]["for"], vllm["SLMKVCacheSaturated"]["labels"]["severity"]) == (
        "2m", "critical")
    assert vllm["SLMRequestsPreempted"]["expr"] == 'slm:preemptions:rate5m{namespace="ns",job="m"} > 0.5'
    assert vllm["SLMRequestsPreempted"]["for"] == "10m"  # the default of the field left out
    assert "SLMQueueSaturated" not in vllm  # vLLM's queue has no limit
    llama = alerts({"runtime": "llamacpp", "resources": {"gpus": 0}})
    assert "SLMKVCacheSaturated" not in llama and "SLMHighErrorRate" not in llama
    assert "SLMTargetDown" in llama
    builtin = alerts({})
    assert "SLMKVCacheSaturated" not in builtin and "SLMHighErrorRate" in builtin
    assert "SLMKVCacheSaturated" not in alerts({"runtime": "vllm", "monitoring": {"alerts": {
        "disabled": ["SLMKVCacheSaturated"]}}})


def test_alerts_a_runtime_cannot_fire_are_named_with_the_reason() -> None:
    problem = render.unsupported_alerts(parse_spec({"model": {"name": "m"}, "runtime": "tgi"}))
    assert problem is not None and problem.reason == "RuntimeLacksSignals"
    assert "SLMKVCacheSaturated: no KV-cache gauge" in problem.message
    assert "SLMHighTimeToFirstToken: TGI records no time to first token" in problem.message
    assert "SLMHighErrorRate" not in problem.message
    # Disabled alerts are acknowledged gaps: not reported.
    acknowledged = render.unsupported_alerts(parse_spec({"model": {"name": "m"}, "monitoring": {"alerts": {
        "disabled": ["SLMKVCacheSaturated", "SLMRequestsPreempted"]}}}))
    assert acknowledged is None
    assert render.unsupported_alerts(parse_spec({"model": {"name": "m"}, "monitoring": {"enabled": False}})) is None


@pytest.mark.parametrize(("spec", "message"), [
    ({"runtime": "vllm", "runtimeArgs": ["--port", "9000"]}, "runtimeArgs may not set --port"),
    ({"runtime": "vllm", "runtimeArgs": ["--served-model-name=x"]}, "runtimeArgs may not set --served-model-name"),
    ({"runtime": "sglang", "runtimeArgs": ["--tp", "4"]}, "--tp abbreviates --tp-size"),
    ({"runtime": "llamacpp", "runtimeArgs": ["-c", "64"]}, "runtimeArgs may not set -c"),
    ({"runtime": "tgi", "model": {"name": "m", "dtype": "float32"}}, "dtype float32 is not supported by TGI"),
    ({"runtimeArgs": ["--foo"]}, "the builtin runtime takes no extra flags"),
])
def test_a_spec_the_runtime_cannot_take_is_refused_naming_why(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse_spec({"model": {"name": "m"}, **spec})
