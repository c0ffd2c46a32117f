"""What `helm template` produces: valid against the Kubernetes and CRD schemas, and what an SRE relies on."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools import tools
from tests.chart.chartlib import (
    CHART,
    CI_VALUES,
    KUBE_VERSION,
    by_kind,
    documents,
    helm,
    kubeconform,
    one,
    render,
    write_schemas,
)

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
VARIANTS: dict[str, list[Path]] = {"default": [], **{p.name.removesuffix("-values.yaml"): [p] for p in CI_VALUES}}
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, bool], list[dict[str, Any]]]:
    """Every variant, with and without the Prometheus Operator API available."""
    return {
        (name, monitoring): documents(render(values=values, monitoring=monitoring))
        for name, values in VARIANTS.items()
        for monitoring in (True, False)
    }


@pytest.fixture(scope="module")
def default_docs(rendered: dict[tuple[str, bool], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered[("default", True)]


@pytest.fixture(scope="module")
def full_docs(rendered: dict[tuple[str, bool], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered[("full", True)]


# --- schemas ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_object_is_valid_against_its_schema_offline(
    variant: str, rendered: dict[tuple[str, bool], list[dict[str, Any]]], tmp_path: Path
) -> None:
    """kubeconform, strict, with no -ignore-missing-schemas: a kind without a schema fails too. Built-in
    kinds use kubernetes-validate's bundled schemas for the pinned minor; custom resources use schemas
    generated from the CRDs (ours and the pinned Prometheus Operator's)."""
    docs = rendered[(variant, True)]
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    crds = [*(CHART / "crds").glob("*.yaml"), *tools.crd_dir_prometheus_operator().glob("*.yaml")]
    report = kubeconform(manifest, write_schemas(tmp_path / "schemas", docs, crds))
    summary = report["summary"]
    problems = [r for r in report.get("resources", []) if r["status"] != "statusValid"]
    assert report["returncode"] == 0 and not problems, problems
    assert summary["valid"] == len(docs) and summary["skipped"] == 0


def test_schema_validation_catches_a_misspelt_field(default_docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """The validation above can fail: a Deployment with a typo in its pod spec is reported."""
    broken = [dict(doc) for doc in default_docs if doc["kind"] == "Deployment"]
    broken[0] = yaml.safe_load(yaml.safe_dump(broken[0]).replace("serviceAccountName:", "serviceAcountName:"))
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump_all(broken))
    report = kubeconform(manifest, write_schemas(tmp_path / "schemas", broken, []))
    assert report["summary"]["invalid"] == 1, report


@pytest.fixture(scope="module")
def notes_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the chart with one more template that puts the rendered NOTES.txt into a ConfigMap:
    `helm template` does not render NOTES, and `helm install --dry-run` needs a reachable cluster."""
    copy = tmp_path_factory.mktemp("notes") / "slm-monitoring"
    shutil.copytree(CHART, copy)
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    (copy / "templates" / "zz-notes.yaml").write_text(
        '{{- define "test.notes" }}' + notes + "{{- end }}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ include "test.notes" . | toJson }}\n'
    )
    return copy


def _notes(chart: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it."""
    out = helm("template", "slm", str(chart), "--namespace", "slm-system", "--kube-version", KUBE_VERSION,
               "--show-only", "templates/zz-notes.yaml", *args).stdout
    return str(yaml.safe_load(out)["data"]["notes"])


def test_example_slmdeployment_in_the_notes_is_valid_against_the_crd(notes_chart: Path, tmp_path: Path) -> None:
    """The SLMDeployment that NOTES.txt tells users to apply passes the CRD's schema."""
    block = _notes(notes_chart).split("kubectl apply -f - <<'YAML'\n", 1)[1].split("     YAML", 1)[0]
    example = yaml.safe_load("\n".join(line.removeprefix("     ") for line in block.splitlines()))
    assert example["kind"] == "SLMDeployment"
    manifest = tmp_path / "example.yaml"
    manifest.write_text(yaml.safe_dump(example))
    report = kubeconform(manifest, write_schemas(tmp_path / "schemas", [example], (CHART / "crds").glob("*.yaml")))
    assert report["summary"]["valid"] == 1, report


# --- the operator ---------------------------------------------------------------------------------

def test_operator_deployment_runs_one_replica_recreated_with_the_app_version_image(
    default_docs: list[dict[str, Any]],
) -> None:
    deployment = one(default_docs, "Deployment", "-operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"ghcr.io/slm-monitoring/slm-operator:{APP_VERSION}"
    assert container["command"] == ["slm-operator", "--all-namespaces"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SLM_OPERATOR_SERVER_IMAGE"] == f"ghcr.io/slm-monitoring/slm-server:{APP_VERSION}"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    assert container["resources"]["requests"]["memory"]


def test_operator_meets_the_restricted_pod_security_standard(default_docs: list[dict[str, Any]]) -> None:
    pod = one(default_docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_namespaced_mode_passes_one_flag_per_namespace_and_grants_roles_only_there(
    rendered: dict[tuple[str, bool], list[dict[str, Any]]],
) -> None:
    docs = rendered[("namespaced", True)]
    container = one(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["slm-operator", "--namespace=team-a", "--namespace=team-b"]
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == ["team-a", "team-b"]
    cluster_rules = one(docs, "ClusterRole", "-operator")["rules"]
    cluster_resources = {res for rule in cluster_rules for res in rule["resources"]}
    # Only what is cluster-scoped (or read across namespaces) stays cluster-wide.
    assert cluster_resources == {"nodes", "customresourcedefinitions", "prometheuses", "namespaces"}
    # rbac.secretReferenceChecks=false in this variant.
    assert not any("secrets" in rule["resources"] for role in roles for rule in role["rules"])


def test_image_digest_replaces_the_tag(full_docs: list[dict[str, Any]]) -> None:
    container = one(full_docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == (
        "registry.example.com/ml/slm-operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )


def test_operator_gets_each_runtimes_pinned_image_and_the_sidecars(
    default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]],
) -> None:
    """The chart's operator.runtimeImages are the images slm_operator.runtimes pins its flags for."""
    from slm_operator.runtimes import PINS

    def env(docs: list[dict[str, Any]]) -> dict[str, Any]:
        container = one(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in container["env"]}

    defaults = env(default_docs)
    images = {name: defaults[f"SLM_OPERATOR_{name}_IMAGE"] for name in ("VLLM", "SGLANG", "TGI", "LLAMACPP",
                                                                         "LLAMACPP_GPU")}
    assert images == {
        "VLLM": "docker.io/vllm/vllm-openai:v0.34.0",
        "SGLANG": "docker.io/lmsysorg/sglang:v0.5.23",
        "TGI": "ghcr.io/huggingface/text-generation-inference:3.3.7",
        "LLAMACPP": "ghcr.io/ggml-org/llama.cpp:server-b11312",
        "LLAMACPP_GPU": "ghcr.io/ggml-org/llama.cpp:server-cuda-b11312",
    }
    assert [images["VLLM"], images["SGLANG"], images["TGI"], images["LLAMACPP"], images["LLAMACPP_GPU"]] == [
        PINS["vllm"].image, PINS["sglang"].image, PINS["tgi"].image, PINS["llamacpp"].image,
        PINS["llamacpp"].gpu_image]
    assert defaults["SLM_OPERATOR_SIDECAR_IMAGE"] == f"ghcr.io/slm-monitoring/slm-sidecar:{APP_VERSION}"
    full = env(full_docs)
    assert full["SLM_OPERATOR_VLLM_IMAGE"] == ("registry.example.com/mirror/vllm-openai:v0.34.0"
                                               "@sha256:89abcdef0123456789abcdef0123456789abcdef0123456789abcdef01234567")
    assert full["SLM_OPERATOR_SIDECAR_IMAGE"] == "ghcr.io/slm-monitoring/slm-sidecar:0.1.0-patched"


# --- RBAC ---------------------------------------------------------------------------------------------

def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        rule
        for doc in docs
        if doc["kind"] in ("ClusterRole", "Role") and doc["metadata"]["name"].endswith("-operator")
        for rule in doc["rules"]
    ]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_operator_rbac_has_no_wildcards_and_never_lists_secrets(
    variant: str, rendered: dict[tuple[str, bool], list[dict[str, Any]]],
) -> None:
    rules = _rules(rendered[(variant, True)])
    if variant == "minimal":
        assert rules  # rbac.create stays on there
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert not any(fnmatch.fnmatch(r, "*/*") and r.split("/")[1] == "*" for r in rule["resources"])
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"], rule
        assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"] and "impersonate" not in rule["verbs"]


def test_operator_rbac_grants_exactly_the_documented_permissions(default_docs: list[dict[str, Any]]) -> None:
    granted = {
        (group, resource, verb)
        for rule in _rules(default_docs)
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # Written out here as documentation; tests/operator/test_rbac.py derives the same set from the code.
    applied = ("get", "list", "watch", "create", "patch")
    unwatched = ("get", "list", "create", "patch", "delete")
    wanted = {
        *{("slm.dev", "slmdeployments", v) for v in ("get", "list", "watch", "patch")},
        ("slm.dev", "slmdeployments/status", "patch"),
        *{("apps", "deployments", v) for v in applied},
        *{("", "services", v) for v in applied},
        *{("policy", "poddisruptionbudgets", v) for v in applied},
        *{("", "configmaps", v) for v in (*applied, "delete")},
        *{("networking.k8s.io", "networkpolicies", v) for v in (*applied, "delete")},
        *{("monitoring.coreos.com", r, v) for r in ("servicemonitors", "prometheusrules", "alertmanagerconfigs")
          for v in unwatched},
        ("monitoring.coreos.com", "prometheuses", "list"),
        ("", "events", "create"),
        ("", "secrets", "get"),
        ("", "nodes", "list"),
        *{("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")},
    }
    assert granted == wanted, f"extra: {granted - wanted}, missing: {wanted - granted}"


def test_cluster_role_binding_binds_the_operator_service_account(default_docs: list[dict[str, Any]]) -> None:
    binding = one(default_docs, "ClusterRoleBinding", "-operator")
    account = one(default_docs, "ServiceAccount", "-operator")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "slm-system"}
    ]
    assert binding["roleRef"]["name"] == one(default_docs, "ClusterRole", "-operator")["metadata"]["name"]


def test_external_service_account_is_used_and_not_created(
    rendered: dict[tuple[str, bool], list[dict[str, Any]]],
) -> None:
    docs = rendered[("minimal", True)]
    assert not [sa for sa in by_kind(docs, "ServiceAccount") if sa["metadata"]["name"] == "slm-operator-external"]
    pod = one(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "slm-operator-external"
    assert one(docs, "ClusterRoleBinding", "-operator")["subjects"][0]["name"] == "slm-operator-external"


# --- monitoring objects -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_monitoring_objects_exist_only_when_the_prometheus_operator_api_is_served(
    variant: str, rendered: dict[tuple[str, bool], list[dict[str, Any]]],
) -> None:
    without = {doc["kind"] for doc in rendered[(variant, False)]}
    assert not (without & MONITORING_KINDS)
    with_api = {doc["kind"] for doc in rendered[(variant, True)]}
    if variant != "minimal":
        assert with_api >= MONITORING_KINDS
    else:
        assert not (with_api & MONITORING_KINDS)


def test_operator_service_monitor_scrapes_the_metrics_port_of_the_operator_service(
    default_docs: list[dict[str, Any]],
) -> None:
    monitor = one(default_docs, "ServiceMonitor", "-operator")
    service = one(default_docs, "Service", "-operator")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["metrics"] == 9090
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["slm-system"]}


def test_kube_prometheus_stack_release_label_goes_on_monitors_and_rules(full_docs: list[dict[str, Any]]) -> None:
    for kind in MONITORING_KINDS:
        for doc in by_kind(full_docs, kind):
            assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack", doc["metadata"]["name"]


def test_selectors_never_carry_the_chart_or_app_version(
    rendered: dict[tuple[str, bool], list[dict[str, Any]]],
) -> None:
    for docs in rendered.values():
        for doc in docs:
            selector = doc.get("spec", {}).get("selector", {})
            labels = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
            assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels, doc["metadata"]


def test_every_object_carries_the_standard_labels(full_docs: list[dict[str, Any]]) -> None:
    for doc in full_docs:
        labels = doc["metadata"]["labels"]
        for key in ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/managed-by", "app.kubernetes.io/version"):
            assert key in labels, (doc["kind"], doc["metadata"]["name"], key)
        assert labels["team"] == "ml-platform"  # commonLabels


def test_fleet_dashboard_configmap_is_labelled_for_the_grafana_sidecar(full_docs: list[dict[str, Any]]) -> None:
    configmap = one(full_docs, "ConfigMap", "-fleet-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"]["grafana_folder"] == "LLM serving"
    assert configmap["metadata"]["namespace"] == "monitoring"
    shipped = (CHART / "dashboards" / "fleet.json").read_text()
    assert configmap["data"]["slm-fleet.json"] == shipped.rstrip("\n")


def test_operator_alert_rules_pass_promtool_and_select_the_operator_job(
    full_docs: list[dict[str, Any]], tmp_path: Path,
) -> None:
    rule = one(full_docs, "PrometheusRule", "-operator")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([tools.tool("promtool"), "check", "rules", str(rules_file)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"SLMOperatorDown", "SLMOperatorReconcileErrors", "SLMOperatorSlowReconciles"}
    job = one(full_docs, "Service", "-operator")["metadata"]["name"]
    for alert in alerts.values():
        assert f'job="{job}"' in alert["expr"]
        assert alert["labels"]["severity"] in ("critical", "warning", "info")
        assert alert["annotations"]["runbook_url"] == f"https://runbooks.example.com/slm/{alert['alert']}.md"


def test_operator_down_alert_fires_after_its_for_duration_and_not_before(
    full_docs: list[dict[str, Any]], tmp_path: Path,
) -> None:
    """`promtool test rules`: a scraped-but-down operator pages after 5m; one minute earlier it does not."""
    rule = one(full_docs, "PrometheusRule", "-operator")
    job = one(full_docs, "Service", "-operator")["metadata"]["name"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    series = f'up{{job="{job}", namespace="slm-system", instance="10.0.0.1:9090"}}'
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": series, "values": "1 1 0x10"}],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "SLMOperatorDown", "exp_alerts": []},
                {"eval_time": "8m", "alertname": "SLMOperatorDown", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "job": job, "namespace": "slm-system",
                                   "instance": "10.0.0.1:9090"},
                    "exp_annotations": {k: v for k, v in rule["spec"]["groups"][0]["rules"][0]["annotations"].items()
                                        if k != "description"} | {
                        "description": rule["spec"]["groups"][0]["rules"][0]["annotations"]["description"]
                        .replace("{{ $labels.namespace }}", "slm-system")},
                }]},
            ],
        }],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    result = subprocess.run([tools.tool("promtool"), "test", "rules", "test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reconcile_error_and_latency_alerts_fire_on_the_operator_metrics(
    full_docs: list[dict[str, Any]], tmp_path: Path,
) -> None:
    """`promtool test rules` with series shaped like slm_operator.metrics: 20 % of reconciles failing
    fires SLMOperatorReconcileErrors once its `for` (15m) has passed, not a minute before; reconciles all slower than
    10 s fire SLMOperatorSlowReconciles; healthy series fire nothing."""
    rule = one(full_docs, "PrometheusRule", "-operator")
    job = one(full_docs, "Service", "-operator")["metadata"]["name"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    target = f'job="{job}", namespace="slm-system", instance="10.0.0.1:9090"'

    def reconciles(result: str, per_minute: int) -> dict[str, str]:
        return {"series": f'slm_operator_reconciles_total{{{target}, trigger="resync", result="{result}"}}',
                "values": f"0+{per_minute}x40"}

    def buckets(slow: bool) -> list[dict[str, str]]:
        # 60 reconciles a minute, all in the (10, 30] bucket when slow, all under 0.1 s otherwise.
        edges = {"0.1": 0 if slow else 60, "10.0": 0 if slow else 60, "30.0": 60, "+Inf": 60}
        return [{"series": f'slm_operator_reconcile_duration_seconds_bucket{{{target}, trigger="resync", le="{le}"}}',
                 "values": f"0+{rate}x40"} for le, rate in edges.items()]

    up = {"series": f"up{{{target}}}", "values": "1x40"}
    exp_labels = {"job": job, "namespace": "slm-system"}
    annotations = {r["alert"]: r["annotations"] for g in rule["spec"]["groups"] for r in g["rules"]}

    def expected(alert: str, description: str) -> dict[str, Any]:
        """The alert as a user receives it: labels, and the description with its values filled in."""
        return {"exp_labels": {**exp_labels, "severity": "warning"},
                "exp_annotations": {**annotations[alert], "description": description}}

    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": [up, reconciles("ok", 48), reconciles("error", 12), *buckets(True)],
             "alert_rule_test": [
                 # Errors are visible from 1m on; `for: 15m` holds the alert back until 16m.
                 {"eval_time": "15m", "alertname": "SLMOperatorReconcileErrors", "exp_alerts": []},
                 {"eval_time": "30m", "alertname": "SLMOperatorReconcileErrors", "exp_alerts": [expected(
                     "SLMOperatorReconcileErrors",
                     "20% of the reconciles of the SLM operator in slm-system ended in an error over the last "
                     "10 minutes (threshold 0.1). Its logs and the SLMDeployments' Events say why.")]},
                 {"eval_time": "30m", "alertname": "SLMOperatorSlowReconciles", "exp_alerts": [expected(
                     "SLMOperatorSlowReconciles",
                     "The 95th percentile of the SLM operator's reconcile duration in slm-system is 29s "
                     "(threshold 10s): threshold edits reach the PrometheusRules late. Check the API server's "
                     "latency and the operator's CPU.")]},
                 {"eval_time": "30m", "alertname": "SLMOperatorDown", "exp_alerts": []},
             ]},
            {"interval": "1m", "input_series": [up, reconciles("ok", 60), reconciles("error", 0), *buckets(False)],
             "alert_rule_test": [
                 {"eval_time": "30m", "alertname": name, "exp_alerts": []}
                 for name in ("SLMOperatorReconcileErrors", "SLMOperatorSlowReconciles", "SLMOperatorDown")
             ]},
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    result = subprocess.run([tools.tool("promtool"), "test", "rules", "test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the DCGM exporter ------------------------------------------------------------------------------------

def test_dcgm_exporter_is_off_by_default(default_docs: list[dict[str, Any]]) -> None:
    assert not by_kind(default_docs, "DaemonSet")


def test_dcgm_exporter_runs_on_gpu_nodes_with_pod_mapping(full_docs: list[dict[str, Any]]) -> None:
    daemonset = one(full_docs, "DaemonSet", "-dcgm-exporter")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DCGM_EXPORTER_KUBERNETES"] == "true"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/lib/kubelet/pod-resources"]["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/var/lib/kubelet/pod-resources"]["name"])
    assert volume["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"


def test_dcgm_service_monitor_honours_the_exporter_pod_labels(full_docs: list[dict[str, Any]]) -> None:
    monitor = one(full_docs, "ServiceMonitor", "-dcgm-exporter")
    service = one(full_docs, "Service", "-dcgm-exporter")
    assert [e["honorLabels"] for e in monitor["spec"]["endpoints"]] == [True]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["scrape"] == "gpu"


# --- network policies and tests --------------------------------------------------------------------------

def test_network_policies_admit_prometheus_to_metrics_and_confine_operator_egress(
    full_docs: list[dict[str, Any]],
) -> None:
    operator = one(full_docs, "NetworkPolicy", "-operator")
    assert operator["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = [p["port"] for rule in operator["spec"]["ingress"] for p in rule["ports"]]
    assert ingress_ports == ["metrics", "health"]
    api = operator["spec"]["egress"][-1]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}] and [p["port"] for p in api["ports"]] == [6443]
    dcgm = one(full_docs, "NetworkPolicy", "-dcgm-exporter")
    assert dcgm["spec"]["egress"] == []
    # The test pod that calls /healthz is the one the operator's policy admits.
    healthz = one(full_docs, "Job", "-test-healthz")["spec"]["template"]["metadata"]["labels"]
    admitted = operator["spec"]["ingress"][1]["from"][0]["podSelector"]["matchLabels"]
    assert admitted.items() <= healthz.items()


def test_network_policies_are_opt_in(default_docs: list[dict[str, Any]]) -> None:
    assert not by_kind(default_docs, "NetworkPolicy")


def test_helm_test_hooks_are_jobs_deleted_when_they_pass(default_docs: list[dict[str, Any]]) -> None:
    hooks = [d for d in default_docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert {d["kind"] for d in hooks} == {"Job", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for hook in hooks:
        assert "hook-succeeded" in hook["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    crd_reader = one(hooks, "ClusterRole", "-test")
    assert crd_reader["rules"] == [{
        "apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
        "resourceNames": ["slmdeployments.slm.dev"], "verbs": ["get", "list", "watch"],
    }]


def test_notes_warn_when_the_prometheus_operator_is_missing_and_say_crds_are_not_upgraded(
    notes_chart: Path,
) -> None:
    without = _notes(notes_chart)
    assert "does not serve monitoring.coreos.com/v1" in without
    assert "never upgrades them" in without
    with_api = _notes(notes_chart, "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    assert "does not serve" not in with_api


def test_operator_alerts_use_only_metrics_the_operator_exports(full_docs: list[dict[str, Any]]) -> None:
    """Contract: every series the operator-health rules read is `up` or a metric registered by
    slm_operator.metrics (fails when a metric is renamed)."""
    import re

    from prometheus_client import CollectorRegistry

    from slm_operator import metrics as operator_metrics

    rule = one(full_docs, "PrometheusRule", "-operator")
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    used = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", exprs)) - {"up"}
    assert used, exprs
    exported: set[str] = set()
    for collector in (operator_metrics.RECONCILES, operator_metrics.RECONCILE_DURATION):
        registry = CollectorRegistry()
        registry.register(collector)
        for family in registry.collect():
            exported |= {family.name + suffix for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    assert used <= exported, f"not exported by the operator: {used - exported}"
