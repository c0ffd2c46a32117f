"""The chart's log plane (`logs.*`): off by default, one switch on; what it renders; and what Pod
Security admission of the real API server says of its pods."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from slm_devtools.cluster import ClusterBase
from slm_devtools.logplane import collector_config, collector_objects, render_chart, store_objects
from tests.chart.chartlib import CHART, documents, helm, render

LOGS_CI_VALUES = CHART / "ci" / "logs-values.yaml"


def test_logs_are_off_by_default() -> None:
    components = {d["metadata"].get("labels", {}).get("app.kubernetes.io/component") for d in documents(render())}
    assert not components & {"log-collector", "log-store"}


def test_one_switch_turns_on_the_collector_and_the_bundled_store() -> None:
    docs = documents(render(set_values=["logs.enabled=true"]))
    collector = collector_objects(docs)
    store = store_objects(docs)
    assert collector["DaemonSet"]["metadata"]["name"] == "slm-slm-monitoring-log-collector"
    assert store["StatefulSet"]["metadata"]["name"] == "slm-slm-monitoring-victorialogs"
    exporter = collector_config(docs)["exporters"]["otlp_http"]
    assert exporter["endpoint"] == "http://slm-slm-monitoring-victorialogs.slm-system.svc:9428/insert/opentelemetry"


def test_collector_reads_the_serving_and_operator_containers_with_checkpoints_and_a_disk_queue() -> None:
    config = collector_config(render_chart())
    filelog = config["receivers"]["filelog"]
    assert filelog["include"] == [
        "/var/log/pods/*_*_*/server/*.log",
        "/var/log/pods/*_*_*/sidecar/*.log",
        "/var/log/pods/slm-system_slm-slm-monitoring-operator-*_*/operator/*.log",
    ]
    assert filelog["storage"] == "file_storage"
    assert [op["type"] for op in filelog["operators"]][:3] == ["regex_parser", "recombine", "move"]
    exporter = config["exporters"]["otlp_http"]
    assert exporter["sending_queue"]["storage"] == "file_storage"
    assert exporter["sending_queue"]["block_on_overflow"] is True
    assert exporter["retry_on_failure"]["max_elapsed_time"] == "0s"  # never give a batch up
    labels = config["processors"]["k8s_attributes"]["extract"]["labels"]
    assert labels == [{"tag_name": "slm.deployment", "key": "slm.dev/deployment", "from": "pod"}]
    assert config["service"]["pipelines"]["logs"] == {
        "receivers": ["filelog"], "processors": ["memory_limiter", "k8s_attributes", "filter/slm-pods"],
        "exporters": ["otlp_http"]}  # fmt: skip


def test_collector_mounts_the_pod_logs_read_only_and_keeps_its_state_on_the_node() -> None:
    daemonset = collector_objects(render_chart())["DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["pod-logs"] == {"name": "pod-logs", "mountPath": "/var/log/pods", "readOnly": True}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pod-logs"]["hostPath"] == {"path": "/var/log/pods", "type": "Directory"}
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/slm-monitoring/otelcol", "type": "DirectoryOrCreate"}
    assert "--feature-gates=stanza.synchronousLogEmitter" in container["args"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def test_collector_may_only_read_pods() -> None:
    role = collector_objects(render_chart())["ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def test_store_keeps_the_configured_retention_on_a_volume_claim() -> None:
    statefulset = store_objects(render_chart(set_values=["logs.retention=30d"]))["StatefulSet"]
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "-retentionPeriod=30d" in args and "-storageDataPath=/storage" in args
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"


def test_default_retention_is_seven_days() -> None:
    args = store_objects(render_chart())["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "-retentionPeriod=7d" in args


@pytest.mark.parametrize(("setting", "complaint"), [
    ("logs.retention=12h", "shorter than one day"),
    ("logs.retention=7 days", "/logs/retention"),
    ("logs.store.enabled=false", "nowhere to ship the logs"),
    ("logs.collector.exporter.endpoint=loki:3100", "/logs/collector/exporter/endpoint"),
])  # fmt: skip
def test_bad_logs_values_are_refused_with_the_reason(setting: str, complaint: str) -> None:
    result = helm("template", "slm", str(CHART), "--set", "logs.enabled=true", "--set", setting, check=False)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


def test_bring_your_own_store_ships_there_with_its_credentials_and_no_bundled_store() -> None:
    docs = documents(render(set_values=[
        "logs.enabled=true", "logs.store.enabled=false", "logs.collector.exporter.endpoint=https://es.example:9200/_otlp",
        "logs.collector.exporter.authorizationSecretRef.name=es-api-key"]))  # fmt: skip
    assert not [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "log-store"]
    exporter = collector_config(docs)["exporters"]["otlp_http"]
    assert exporter["endpoint"] == "https://es.example:9200/_otlp"
    assert exporter["headers"] == {"Authorization": "${file:/secrets/exporter/authorization}"}
    pod = collector_objects(docs)["DaemonSet"]["spec"]["template"]["spec"]
    assert {"name": "exporter-secret",
            "secret": {"secretName": "es-api-key", "items": [{"key": "authorization", "path": "authorization"}]}
            } in pod["volumes"]  # fmt: skip
    assert {"name": "exporter-secret", "mountPath": "/secrets/exporter", "readOnly": True} in (
        pod["containers"][0]["volumeMounts"])


# ---- Pod Security admission (the real API server) ------------------------------------------------------


def _pod_of(workload: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The pod its controller would create (a StatefulSet's with its claims as volumes)."""
    template = workload["spec"]["template"]
    name = workload["metadata"]["name"] + "-0"
    spec = dict(template["spec"])
    claims = [c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])]
    if claims:
        spec["volumes"] = [*spec.get("volumes", []), *(
            {"name": claim, "persistentVolumeClaim": {"claimName": f"{claim}-{name}"}} for claim in claims)]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": template["metadata"]["labels"]},
            "spec": spec}  # fmt: skip


def _admitted(cluster: ClusterBase, pod: dict[str, Any], docs: list[dict[str, Any]]) -> tuple[bool, str]:
    """Whether the API server (Pod Security admission included) admits the pod, with the chart's
    ServiceAccounts in place; what it said."""
    for account in (d for d in docs if d["kind"] == "ServiceAccount"):
        cluster.kubectl("apply", "-n", pod["metadata"]["namespace"], "-f", "-", input=json.dumps(account))
    result = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    return result.returncode == 0, result.stderr


def _namespace(cluster: ClusterBase, level: str) -> str:
    name = cluster.new_namespace("pss", restricted=False)
    cluster.kubectl("label", "namespace", name, f"pod-security.kubernetes.io/enforce={level}", "--overwrite")
    return name


@pytest.mark.e2e
def test_store_pod_is_admitted_under_the_restricted_standard(cluster: ClusterBase) -> None:
    namespace = _namespace(cluster, "restricted")
    docs = documents(render(values=[LOGS_CI_VALUES], namespace=namespace))
    ok, why = _admitted(cluster, _pod_of(store_objects(docs)["StatefulSet"], namespace), docs)
    assert ok, why


@pytest.mark.e2e
def test_collector_pod_needs_the_privileged_standard_for_its_host_path_only(cluster: ClusterBase) -> None:
    """hostPath volumes are refused by baseline and restricted alike: the collector's namespace must be
    privileged (docs/logging.md). Under restricted the refusal names the host paths and UID 0, nothing else."""
    docs = {}
    for level in ("restricted", "baseline", "privileged"):
        namespace = _namespace(cluster, level)
        docs[level] = (namespace, documents(render(values=[LOGS_CI_VALUES], namespace=namespace)))
    verdicts = {}
    for level, (namespace, rendered) in docs.items():
        verdicts[level] = _admitted(cluster, _pod_of(collector_objects(rendered)["DaemonSet"], namespace), rendered)
    assert not verdicts["restricted"][0] and not verdicts["baseline"][0] and verdicts["privileged"][0], verdicts
    assert verdicts["baseline"][1].strip().endswith(
        'violates PodSecurity "baseline:latest": hostPath volumes (volumes "pod-logs", "state")')
    # Nothing but the host paths and UID 0: capabilities, privilege escalation and seccomp pass.
    assert verdicts["restricted"][1].strip().endswith(
        'violates PodSecurity "restricted:latest": restricted volume types (volumes "pod-logs", "state" use '
        'restricted volume type "hostPath"), runAsNonRoot != true (pod must not set securityContext.runAsNonRoot='
        'false), runAsUser=0 (pod must not set runAsUser=0)'), verdicts["restricted"][1]


def test_logs_ci_values_render_every_logs_option() -> None:
    docs = documents(render(values=[LOGS_CI_VALUES]))
    exporter = collector_config(docs)["exporters"]["otlp_http"]
    assert exporter["headers"] == {"X-Scope-OrgID": "ml-platform",
                                  "Authorization": "${file:/secrets/exporter/authorization}"}
    statefulset = store_objects(docs)["StatefulSet"]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "victoriametrics/victoria-logs:v1.52.2@sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210")
    assert "-retention.maxDiskSpaceUsageBytes=45GiB" in statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert yaml.safe_dump(docs)  # every object is plain data
