"""The renderers are pure: an SLMDeployment in, its children out, through render.desired_children —
the very function the reconcile applies. Golden files pin the Kubernetes YAML (regenerate with
SLM_UPDATE_GOLDEN=1 after an intended change and review the diff); the other tests name the property
a user relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_operator import render
from slm_operator.render import RenderContext
from slm_operator.spec import Parent, parse_spec
from tests.operator.conftest import EXAMPLES, REPO, load_example

GOLDEN = Path(__file__).parent / "golden"
# Pinned byte for byte; every other example is still checked by the property tests below.
GOLDEN_EXAMPLES = [p for p in EXAMPLES if p.stem in ("phi-mini", "tiny-cpu", "with-notifications")]
UID = "00000000-0000-4000-8000-000000000001"
IMAGE = "registry.example/slm-server:1.0"


CONTEXT = RenderContext(server_image=IMAGE)


def children_of(example: Path, context: RenderContext = CONTEXT) -> list[dict[str, Any]]:
    obj = load_example(example)
    parent = Parent(obj["metadata"]["name"], "llm", UID)
    return render.desired_children(parent, parse_spec(obj["spec"]), context)


def children(spec: dict[str, Any], context: RenderContext = CONTEXT) -> list[dict[str, Any]]:
    return render.desired_children(Parent("m", "ns", UID), parse_spec(spec), context)


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [c["kind"] for c in children]
    assert len(kinds) == len(set(kinds)), kinds
    return {c["kind"]: c for c in children}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("example", GOLDEN_EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"])
def test_kubernetes_objects_match_golden_files(example: Path, kind: str) -> None:
    rendered = yaml.safe_dump(by_kind(children_of(example))[kind], sort_keys=True)
    golden = GOLDEN / example.stem / f"{kind}.yaml"
    if os.environ.get("SLM_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"{golden} missing: run with SLM_UPDATE_GOLDEN=1"
    assert rendered == golden.read_text()


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


def test_serving_pods_are_restricted_gpu_pods_with_probes() -> None:
    deployment = by_kind(children_of(REPO / "examples" / "phi-mini.yaml"))["Deployment"]
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
    # The hub download (20Gi by default) and /tmp (1Gi) are emptyDirs: asked for, and capped.
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "16Gi", "ephemeral-storage": "21Gi"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["emptyDir"] == {"sizeLimit": "20Gi"} and volumes["tmp"]["emptyDir"] == {"sizeLimit": "1Gi"}
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
                   "requestTimeoutSeconds": 9, "prefillChunkTokens": 128, "prefixCacheMiB": 0},
        "logging": {"level": "debug", "outputs": "truncated", "sampleRate": 0.5},
    }
    env = env_of(by_kind(children(spec))["Deployment"])
    assert env["SLM_MODEL"] == "org/m" and env["SLM_MODEL_REVISION"] == "v2" and env["SLM_MODEL_NAME"] == "m"
    assert env["SLM_DTYPE"] == "float16" and env["SLM_PORT"] == "8000" and env["SLM_HOST"] == "0.0.0.0"  # noqa: S104
    assert (env["SLM_MAX_NEW_TOKENS"], env["SLM_MAX_CONCURRENT_REQUESTS"], env["SLM_MAX_QUEUE"]) == ("64", "2", "4")
    assert env["SLM_REQUEST_TIMEOUT_SECONDS"] == "9"
    assert env["SLM_MAX_BATCH_SIZE"] == "1" and env["SLM_PREFILL_CHUNK_TOKENS"] == "128"
    assert env["SLM_PREFIX_CACHE_MIB"] == "0"
    assert (env["SLM_LOG_LEVEL"], env["SLM_LOG_OUTPUTS"], env["SLM_LOG_SAMPLE_RATE"]) == ("debug", "truncated", "0.5")
    assert all(isinstance(v, str) for v in env.values())
    assert not any(name.startswith(("SLM_FAULT", "SLM_ADMIN")) for name in env)


def test_a_model_from_a_pvc_is_mounted_read_only_at_data_and_cpu_pods_ask_no_gpu() -> None:
    deployment = by_kind(children_of(REPO / "examples" / "tiny-cpu.yaml"))["Deployment"]
    c = container(deployment)
    env = env_of(deployment)
    assert env["SLM_MODEL"] == "/data" and env["SLM_MODEL_NAME"] == "tiny-gpt2" and env["HF_HUB_OFFLINE"] == "1"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data")
    assert mount == {"name": "model", "mountPath": "/data", "readOnly": True, "subPath": "tiny-gpt2"}
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert "tolerations" not in deployment["spec"]["template"]["spec"]
    # Nothing is downloaded: only /tmp counts against the node's disk.
    assert c["resources"]["requests"]["ephemeral-storage"] == "1Gi"


def test_storage_limits_and_an_explicit_ephemeral_storage_request_are_honoured() -> None:
    spec = {"model": {"name": "m"}, "resources": {"modelCacheSizeLimit": "512Mi", "tmpSizeLimit": "256Mi"}}
    deployment = by_kind(children(spec))["Deployment"]
    assert container(deployment)["resources"]["requests"] == {"ephemeral-storage": "768Mi"}
    volumes = {v["name"]: v["emptyDir"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes == {"model": {"sizeLimit": "512Mi"}, "tmp": {"sizeLimit": "256Mi"}}
    spec["resources"]["requests"] = {"ephemeral-storage": "5Gi"}  # type: ignore[index]
    assert container(by_kind(children(spec))["Deployment"])["resources"]["requests"] == {"ephemeral-storage": "5Gi"}


def test_fault_injection_needs_the_operator_level_allow_flag() -> None:
    spec = {"model": {"name": "m"}, "server": {"faultsAdmin": True, "adminTokenSecretRef": {"name": "adm", "key": "t"}}}
    denied = env_of(by_kind(children(spec))["Deployment"])
    assert not any(name.startswith(("SLM_FAULT", "SLM_ADMIN")) for name in denied)
    assert [p.reason for p in render.policy_problems(parse_spec(spec), CONTEXT)] == ["FaultInjectionNotAllowed"]
    allowed_context = RenderContext(server_image=IMAGE, allow_fault_injection=True)
    allowed = env_of(by_kind(children(spec, allowed_context))["Deployment"])
    assert allowed["SLM_FAULTS_ADMIN"] == "true"
    assert allowed["SLM_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "adm", "key": "t"}}
    assert render.policy_problems(parse_spec(spec), allowed_context) == []


def test_full_output_logging_needs_the_operator_level_allow_flag() -> None:
    spec = {"model": {"name": "m"}, "logging": {"outputs": "full"}}
    assert env_of(by_kind(children(spec))["Deployment"])["SLM_LOG_OUTPUTS"] == "hash"
    assert [p.reason for p in render.policy_problems(parse_spec(spec), CONTEXT)] == ["FullOutputLoggingNotAllowed"]
    allowed_context = RenderContext(server_image=IMAGE, allow_full_output_logging=True)
    assert env_of(by_kind(children(spec, allowed_context))["Deployment"])["SLM_LOG_OUTPUTS"] == "full"


def test_output_hashes_are_keyed_from_the_referenced_secret_never_copied() -> None:
    spec = {"model": {"name": "m"}, "logging": {"outputHashKeySecretRef": {"name": "hashkey", "key": "k"}}}
    deployment = by_kind(children(spec))["Deployment"]
    assert env_of(deployment)["SLM_OUTPUT_HASH_KEY"] == {"secretKeyRef": {"name": "hashkey", "key": "k"}}
    # Only where outputs are hashed: with outputs none the pod does not get the key at all.
    spec["logging"]["outputs"] = "none"  # type: ignore[index]
    assert "SLM_OUTPUT_HASH_KEY" not in env_of(by_kind(children(spec))["Deployment"])


def test_network_policy_admits_clients_from_allowed_namespaces_and_prometheus_on_the_serving_port() -> None:
    spec = {"model": {"name": "m"}, "networkPolicy": {"allowedNamespaces": ["gateway"]}}
    context = RenderContext(server_image=IMAGE, prometheus_namespaces=("monitoring",))
    policy = by_kind(children(spec, context))["NetworkPolicy"]["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "slm-server",
                                                     "app.kubernetes.io/instance": "m"}}
    assert policy["policyTypes"] == ["Ingress"]
    clients, scrapers = policy["ingress"]
    assert clients == {"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["gateway", "ns"]}]}}],
        "ports": [{"port": "http", "protocol": "TCP"}]}
    assert scrapers == {"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}]},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
        "ports": [{"port": "http", "protocol": "TCP"}]}
    # The spec's own list wins over what was detected; monitoring off: no scrape rule; switched off: none.
    spec["networkPolicy"]["prometheusNamespaces"] = ["obs"]  # type: ignore[index]
    scrapers = by_kind(children(spec, context))["NetworkPolicy"]["spec"]["ingress"][1]
    assert scrapers["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["obs"]
    assert len(by_kind(children({**spec, "monitoring": {"enabled": False}}))["NetworkPolicy"]["spec"]["ingress"]) == 1
    assert "NetworkPolicy" not in by_kind(children({"model": {"name": "m"}, "networkPolicy": {"enabled": False}}))


def test_service_monitor_scrapes_port_http_and_keeps_the_endpoint_label() -> None:
    context = RenderContext(server_image=IMAGE, monitor_labels=render.MonitorLabels(service_monitor={"release": "kps"}))
    rendered = by_kind(children({"model": {"name": "x"}, "monitoring": {"scrapeInterval": "5s"}}, context))
    sm = rendered["ServiceMonitor"]
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["port"] == "http" and endpoint["interval"] == "5s" and endpoint["path"] == "/metrics"
    assert {"action": "labeldrop", "regex": "endpoint"} in endpoint["relabelings"]
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ns"]}
    service = rendered["Service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["name"] == "m"  # job="<name>" in every series (metric contract)


def test_user_strings_cannot_break_the_yaml() -> None:
    spec = {"model": {"name": 'evil"\n  injected: true\n{{ x }}'}, "nodeSelector": {"a": "b: c"}}
    deployment = by_kind(children(spec))["Deployment"]
    assert env_of(deployment)["SLM_MODEL"] == spec["model"]["name"]
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"a": "b: c"}


def test_threshold_edit_changes_only_the_rule_and_the_dashboard() -> None:
    before = {"model": {"name": "x"}}
    after = {"model": {"name": "x"}, "monitoring": {"alerts": {"errorRate": {"threshold": 0.2}}}}
    old, new = by_kind(children(before)), by_kind(children(after))
    changed = {kind for kind in old if old[kind] != new[kind]}
    assert "PrometheusRule" in changed
    assert changed <= {"PrometheusRule", "ConfigMap"}
    assert "0.2" in json.dumps(new["PrometheusRule"]["spec"]["groups"])


def test_monitoring_children_follow_the_spec_switches() -> None:
    kinds = lambda spec: [c["kind"] for c in children(spec)]  # noqa: E731
    base = {"model": {"name": "x"}}
    assert kinds(base) == ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor",
                           "PrometheusRule", "ConfigMap"]
    assert kinds({**base, "monitoring": {"enabled": False}}) == ["Deployment", "Service", "PodDisruptionBudget",
                                                                  "NetworkPolicy"]
    assert "ConfigMap" not in kinds({**base, "monitoring": {"dashboards": {"enabled": False}}})
    with_hook = {**base, "monitoring": {"notifications": {"webhook": {"urlSecretRef": {"name": "h", "key": "u"}}}}}
    assert kinds(with_hook)[-1] == "AlertmanagerConfig"
    refs = parse_spec(with_hook).secret_refs()
    assert [(path, ref.name, ref.key) for path, ref in refs] == [
        ("spec.monitoring.notifications.webhook.urlSecretRef", "h", "u")]


def test_dashboard_config_map_carries_the_sidecar_labels_and_folder() -> None:
    spec = {"model": {"name": "x"}, "monitoring": {"dashboards": {"labels": {"grafana_dashboard": "1"},
                                                                  "folder": "LLMs"}}}
    cm = by_kind(children(spec))["ConfigMap"]
    assert cm["metadata"]["name"] == "m-dashboard"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLMs"}
    (key, text), = cm["data"].items()
    assert key == "m.json" and isinstance(json.loads(text), dict)


def test_a_failing_monitoring_renderer_is_reported_and_serving_still_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**_: Any) -> Any:
        raise ValueError("boom")

    monkeypatch.setattr(render.dashboards, "render_dashboard", broken)
    with pytest.raises(ValueError, match="boom"):
        children({"model": {"name": "x"}})
    failures: list[str] = []
    rendered = render.desired_children(Parent("m", "ns", UID), parse_spec({"model": {"name": "x"}}), CONTEXT,
                                       on_error=lambda kind, exc: failures.append(f"{kind}: {exc}"))
    assert failures == ["ConfigMap: boom"]
    assert [c["kind"] for c in rendered][:3] == ["Deployment", "Service", "PodDisruptionBudget"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_built_in_kinds_validate_against_the_kubernetes_schema(example: Path) -> None:
    import kubernetes_validate

    for child in children_of(example):
        if child["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # checked by the API server with the real CRDs in tests/e2e
        kubernetes_validate.validate(child, "1.33", strict=True)
