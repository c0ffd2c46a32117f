"""The renderers are pure: an SLMDeployment in, its children out. Golden files pin the Kubernetes YAML
(regenerate with SLM_UPDATE_GOLDEN=1 after an intended change and review the diff); the other tests
name the property a user relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_operator import render
from slm_operator.spec import Parent
from tests.operator.conftest import EXAMPLES, load_example

GOLDEN = Path(__file__).parent / "golden"
# Pinned byte for byte; every other example is still checked by the property tests below.
GOLDEN_EXAMPLES = [p for p in EXAMPLES if p.stem in ("phi-mini", "tiny-cpu", "with-notifications")]
UID = "00000000-0000-4000-8000-000000000001"
IMAGE = "registry.example/slm-server:1.0"


def children_of(example: Path, **kwargs: Any) -> list[dict[str, Any]]:
    obj = load_example(example)
    parent = Parent(obj["metadata"]["name"], "llm", UID)
    return render.render_children(parent, obj["spec"], server_image=IMAGE, **kwargs)


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [c["kind"] for c in children]
    assert len(kinds) == len(set(kinds)), kinds
    return {c["kind"]: c for c in children}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.usefixtures("monitoring_renderers")
@pytest.mark.parametrize("example", GOLDEN_EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"])
def test_kubernetes_objects_match_golden_files(example: Path, kind: str) -> None:
    rendered = yaml.safe_dump(by_kind(children_of(example))[kind], sort_keys=True)
    golden = GOLDEN / example.stem / f"{kind}.yaml"
    if os.environ.get("SLM_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"{golden} missing: run with SLM_UPDATE_GOLDEN=1"
    assert rendered == golden.read_text()


@pytest.mark.usefixtures("monitoring_renderers")
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_child_is_owned_labelled_and_deterministically_named(example: Path) -> None:
    first, second = children_of(example), children_of(example)
    assert first == second  # same spec, same bytes: no spurious writes
    name = load_example(example)["metadata"]["name"]
    for child in first:
        meta = child["metadata"]
        assert meta["namespace"] == "llm"
        assert meta["name"] in (name, f"{name}-dashboard")
        assert meta["ownerReferences"] == [{
            "apiVersion": "slm.dev/v1alpha1", "kind": "SLMDeployment", "name": name, "uid": UID,
            "controller": True, "blockOwnerDeletion": False,
        }]
        for key in ("name", "instance", "component", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in meta["labels"], (child["kind"], key)


@pytest.mark.usefixtures("monitoring_renderers")
def test_serving_pods_are_restricted_gpu_pods_with_probes() -> None:
    deployment = by_kind(children_of(GOLDEN.parent.parent.parent / "examples" / "phi-mini.yaml"))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/data"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "16Gi"}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert "app.kubernetes.io/version" not in selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_server_env_follows_the_settings_contract() -> None:
    spec = {
        "model": {"name": "org/m", "revision": "v2", "dtype": "float16", "servedName": "m"},
        "server": {"maxNewTokens": 64, "maxConcurrentRequests": 2, "maxBatchSize": 1, "maxQueue": 4,
                   "requestTimeoutSeconds": 9, "faultsAdmin": True, "prefillChunkTokens": 128,
                   "prefixCacheMiB": 0},
        "logging": {"level": "debug", "outputs": "full", "sampleRate": 0.5},
    }
    env = {e["name"]: e["value"] for e in render.server_env(spec)}
    assert env["SLM_MODEL"] == "org/m" and env["SLM_MODEL_REVISION"] == "v2" and env["SLM_MODEL_NAME"] == "m"
    assert env["SLM_DTYPE"] == "float16" and env["SLM_PORT"] == "8000" and env["SLM_HOST"] == "0.0.0.0"  # noqa: S104
    assert (env["SLM_MAX_NEW_TOKENS"], env["SLM_MAX_CONCURRENT_REQUESTS"], env["SLM_MAX_QUEUE"]) == ("64", "2", "4")
    assert env["SLM_REQUEST_TIMEOUT_SECONDS"] == "9" and env["SLM_FAULTS_ADMIN"] == "true"
    assert env["SLM_MAX_BATCH_SIZE"] == "1" and env["SLM_PREFILL_CHUNK_TOKENS"] == "128"
    assert env["SLM_PREFIX_CACHE_MIB"] == "0"
    assert (env["SLM_LOG_LEVEL"], env["SLM_LOG_OUTPUTS"], env["SLM_LOG_SAMPLE_RATE"]) == ("debug", "full", "0.5")
    assert all(isinstance(v, str) for v in env.values())


@pytest.mark.usefixtures("monitoring_renderers")
def test_a_model_from_a_pvc_is_mounted_read_only_at_data_and_cpu_pods_ask_no_gpu() -> None:
    deployment = by_kind(children_of(GOLDEN.parent.parent.parent / "examples" / "tiny-cpu.yaml"))["Deployment"]
    c = container(deployment)
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SLM_MODEL"] == "/data" and env["SLM_MODEL_NAME"] == "tiny-gpt2" and env["HF_HUB_OFFLINE"] == "1"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data")
    assert mount == {"name": "model", "mountPath": "/data", "readOnly": True, "subPath": "tiny-gpt2"}
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert "tolerations" not in deployment["spec"]["template"]["spec"]


def test_service_monitor_scrapes_port_http_and_keeps_the_endpoint_label() -> None:
    parent = Parent("m", "ns", UID)
    sm = render.render_service_monitor(parent, {"monitoring": {"scrapeInterval": "5s"}},
                                       render.MonitorLabels(service_monitor={"release": "kps"}))
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["port"] == "http" and endpoint["interval"] == "5s" and endpoint["path"] == "/metrics"
    assert {"action": "labeldrop", "regex": "endpoint"} in endpoint["relabelings"]
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ns"]}
    service = render.render_service(parent)
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["name"] == "m"  # job="<name>" in every series (metric contract)


def test_user_strings_cannot_break_the_yaml() -> None:
    parent = Parent("m", "ns", UID)
    spec = {"model": {"name": 'evil"\n  injected: true\n{{ x }}'}, "nodeSelector": {"a": "b: c"}}
    deployment = render.render_deployment(parent, spec, server_image="img")
    env = {e["name"]: e["value"] for e in container(deployment)["env"]}
    assert env["SLM_MODEL"] == spec["model"]["name"]
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"a": "b: c"}


@pytest.mark.usefixtures("monitoring_renderers")
def test_threshold_edit_changes_only_the_rule_and_the_dashboard() -> None:
    parent = Parent("m", "ns", UID)
    before = {"model": {"name": "x"}}
    after = {"model": {"name": "x"}, "monitoring": {"alerts": {"errorRate": {"threshold": 0.2}}}}
    old = by_kind(render.render_children(parent, before, server_image=IMAGE))
    new = by_kind(render.render_children(parent, after, server_image=IMAGE))
    changed = {kind for kind in old if old[kind] != new[kind]}
    assert "PrometheusRule" in changed
    assert changed <= {"PrometheusRule", "ConfigMap"}
    assert "0.2" in json.dumps(new["PrometheusRule"]["spec"]["groups"])


@pytest.mark.usefixtures("monitoring_renderers")
def test_monitoring_children_follow_the_spec_switches() -> None:
    parent = Parent("m", "ns", UID)
    kinds = lambda spec: [c["kind"] for c in render.render_children(parent, spec, server_image=IMAGE)]  # noqa: E731
    base = {"model": {"name": "x"}}
    assert kinds(base) == ["Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule",
                           "ConfigMap"]
    assert kinds({**base, "monitoring": {"enabled": False}}) == ["Deployment", "Service", "PodDisruptionBudget"]
    assert "ConfigMap" not in kinds({**base, "monitoring": {"dashboards": {"enabled": False}}})
    with_hook = {**base, "monitoring": {"notifications": {"webhook": {"urlSecretRef": {"name": "h", "key": "u"}}}}}
    assert kinds(with_hook)[-1] == "AlertmanagerConfig"
    assert render.secret_refs(with_hook) == [("spec.monitoring.notifications.webhook.urlSecretRef", "h", "u")]


@pytest.mark.usefixtures("monitoring_renderers")
def test_dashboard_config_map_carries_the_sidecar_labels_and_folder() -> None:
    parent = Parent("m", "ns", UID)
    spec = {"model": {"name": "x"}, "monitoring": {"dashboards": {"labels": {"grafana_dashboard": "1"},
                                                                  "folder": "LLMs"}}}
    cm = render.render_dashboard_config_map(parent, spec)
    assert cm["metadata"]["name"] == "m-dashboard"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLMs"}
    (key, text), = cm["data"].items()
    assert key == "m.json" and isinstance(json.loads(text), dict)


@pytest.mark.usefixtures("monitoring_renderers")
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_built_in_kinds_validate_against_the_kubernetes_schema(example: Path) -> None:
    import kubernetes_validate

    for child in children_of(example):
        if child["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # checked by the API server with the real CRDs in tests/e2e
        kubernetes_validate.validate(child, "1.33", strict=True)
