"""The DCGM exporter the chart deploys: least privilege (no capability, read-only root filesystem, no
profiling field), the counters it exports are the ones the rules and dashboards read, its own namespace,
and every third-party image the chart runs pinned by digest."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools.cluster import ClusterBase, wait_for
from slm_devtools.tools import REPO_ROOT
from tests.chart.chartlib import CHART, CI_VALUES, KUBE_VERSION, documents, helm, one, render
from tests.chart.test_e2e import Release

MONITORING_DATA = REPO_ROOT / "operator" / "slm_operator" / "monitoring"
DCGM_FIELD = re.compile(r"\bDCGM_FI_[A-Z0-9]+(?:_[A-Z0-9]+)+\b")
ON = ["dcgmExporter.enabled=true"]


def exporter(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DaemonSet's pod spec and its one container."""
    pod = one(docs, "DaemonSet", "-dcgm-exporter")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def counters(docs: list[dict[str, Any]]) -> list[list[str]]:
    """The counters file the exporter reads: the ConfigMap behind DCGM_EXPORTER_COLLECTORS."""
    pod, container = exporter(docs)
    path = Path(next(e["value"] for e in container["env"] if e["name"] == "DCGM_EXPORTER_COLLECTORS"))
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    lines = configmap["data"][path.name].splitlines()
    return [[cell.strip() for cell in line.split(",", 2)] for line in lines if line and not line.startswith("#")]


def fields_read_by_rules_and_dashboards() -> set[str]:
    sources = [*MONITORING_DATA.rglob("*.yaml"), *MONITORING_DATA.rglob("*.py"), *(CHART / "dashboards").glob("*")]
    return {field for source in sources for field in DCGM_FIELD.findall(source.read_text())}


def test_the_counters_file_exports_exactly_the_fields_the_rules_and_dashboards_read() -> None:
    exported = counters(documents(render(set_values=ON)))
    fields = [row[0] for row in exported]
    assert len(fields) == len(set(fields))
    declared = yaml.safe_load((MONITORING_DATA / "data" / "metrics.yaml").read_text())["dcgm_exporter"]
    assert set(fields) == set(declared)
    read = fields_read_by_rules_and_dashboards()
    assert "DCGM_FI_DEV_GPU_UTIL" in read and read <= set(fields)
    assert not [f for f in fields if f.startswith("DCGM_FI_PROF_")]
    assert all(row[1] in ("gauge", "counter", "label") and row[2] for row in exported)


def test_the_exporter_has_no_capability_and_writes_only_to_size_limited_scratch_space() -> None:
    pod, container = exporter(documents(render(set_values=ON)))
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    assert {m["mountPath"] for m in writable} == {"/tmp", "/var/log"}
    assert all(volumes[m["name"]]["emptyDir"]["sizeLimit"] for m in writable)
    read_only = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if m.get("readOnly")}
    assert read_only["/var/lib/kubelet/pod-resources"]["hostPath"]["type"] == "Directory"
    assert pod["automountServiceAccountToken"] is False


def test_extra_counters_are_added_once_and_roll_the_exporter() -> None:
    extra = ["dcgmExporter.extraCounters[0].field=DCGM_FI_DEV_SM_CLOCK",
             "dcgmExporter.extraCounters[0].type=gauge",
             "dcgmExporter.extraCounters[0].help=SM clock frequency (in MHz).",
             "dcgmExporter.extraCounters[1].field=DCGM_FI_DEV_GPU_UTIL",
             "dcgmExporter.extraCounters[1].type=gauge"]
    plain, more = documents(render(set_values=ON)), documents(render(set_values=ON + extra))
    assert counters(more) == [*counters(plain), ["DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz)."]]

    def checksum(docs: list[dict[str, Any]]) -> str:
        return str(one(docs, "DaemonSet", "-dcgm-exporter")["spec"]["template"]["metadata"]["annotations"][
            "checksum/counters"])

    assert checksum(plain) != checksum(more)


@pytest.mark.parametrize("field", ["DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gpu_util"])
def test_profiling_and_malformed_fields_are_refused_naming_the_value(field: str) -> None:
    result = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, "--set", ON[0],
                  "--set", f"dcgmExporter.extraCounters[0].field={field}",
                  "--set", "dcgmExporter.extraCounters[0].type=gauge", check=False)
    assert result.returncode != 0
    assert "extraCounters" in result.stderr, result.stderr


def test_the_exporter_can_live_in_its_own_namespace() -> None:
    docs = documents(render(namespace="slm-system", set_values=[*ON, "dcgmExporter.namespace=gpu-monitoring",
                                                                "networkPolicy.enabled=true"]))
    dcgm = [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "dcgm-exporter"]
    assert {d["kind"] for d in dcgm} == {"DaemonSet", "Service", "ServiceAccount", "ServiceMonitor", "ConfigMap",
                                         "NetworkPolicy"}
    assert {d["metadata"]["namespace"] for d in dcgm} == {"gpu-monitoring"}
    monitor = one(docs, "ServiceMonitor", "-dcgm-exporter")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["gpu-monitoring"]}
    assert one(docs, "Deployment", "-operator")["metadata"]["namespace"] == "slm-system"


def test_an_invalid_namespace_is_refused() -> None:
    result = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, "--set", ON[0],
                  "--set", "dcgmExporter.namespace=GPU_Monitoring", check=False)
    assert result.returncode != 0 and "namespace" in result.stderr


def images(docs: list[dict[str, Any]]) -> set[str]:
    found = set()
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {}) if doc["kind"] != "Pod" else spec
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            found.add(container["image"])
    return found


@pytest.mark.parametrize("values", [[], *[[p] for p in CI_VALUES]], ids=lambda v: v[0].name if v else "default")
def test_every_third_party_image_is_pinned_by_digest(values: list[Path]) -> None:
    """The project's own images are pinned at release (docs/release.md); every other image always."""
    docs = documents(render(values=values, set_values=ON))
    own = re.compile(r"/slm-(operator|server)[:@]")
    third_party = {image for image in images(docs) if not own.search(image)}
    assert any(i.startswith("nvcr.io/nvidia/k8s/dcgm-exporter:") for i in third_party)
    unpinned = [i for i in third_party if not re.search(r":[\w.\-]+@sha256:[0-9a-f]{64}$", i)]
    assert not unpinned


def test_the_notes_name_the_exporters_namespace_and_ask_for_no_capability(tmp_path: Path) -> None:
    copy = tmp_path / "slm-monitoring"
    shutil.copytree(CHART, copy)
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    (copy / "templates" / "zz-notes.yaml").write_text(
        '{{- define "test.notes" }}' + notes + "{{- end }}\napiVersion: v1\nkind: ConfigMap\nmetadata:\n"
        '  name: notes\ndata:\n  notes: {{ include "test.notes" . | toJson }}\n')
    out = helm("template", "slm", str(copy), "--namespace", "slm-system", "--kube-version", KUBE_VERSION,
               "--show-only", "templates/zz-notes.yaml", "--set", ON[0],
               "--set", "dcgmExporter.namespace=gpu-monitoring").stdout
    text = yaml.safe_load(out)["data"]["notes"]
    assert 'namespace "gpu-monitoring" must allow privileged pods' in text
    assert "SYS_ADMIN" not in text


@pytest.mark.e2e
def test_the_exporter_runs_in_its_own_privileged_namespace_beside_a_restricted_operator(
    cluster: ClusterBase,
) -> None:
    """On a real API server: the operator's namespace enforces the restricted Pod Security Standard, the
    exporter's own namespace admits it, and its pods land on every (fake) GPU node there."""
    cluster.install_prometheus_operator_crds()
    operator_namespace = cluster.new_namespace("slm-op")
    gpu_namespace = cluster.new_namespace("slm-gpu", restricted=False)
    cluster.kubectl("label", "namespace", gpu_namespace, "pod-security.kubernetes.io/enforce=privileged")
    release = Release(cluster, f"own-{uuid.uuid4().hex[:5]}", operator_namespace)
    try:
        # The GPU nodes are KWOK's; where they are tainted as fake (kind), the exporter is let onto them.
        tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                       {"key": "kwok.x-k8s.io/node", "operator": "Exists"}]
        release.helm("install", release.name, str(CHART), "--wait", "--timeout", "180s", "--set", ON[0],
                     "--set", f"dcgmExporter.namespace={gpu_namespace}", "--set", "tests.enabled=false",
                     "--set-json", f"dcgmExporter.tolerations={json.dumps(tolerations)}")
        gpu_nodes = {n["metadata"]["name"] for n in cluster.kubectl_json(
            "get", "nodes", "-l", "nvidia.com/gpu.present=true")["items"]}

        def on_every_gpu_node() -> bool:
            pods = cluster.kubectl_json("get", "pods", "-n", gpu_namespace, "-l",
                                        "app.kubernetes.io/component=dcgm-exporter")["items"]
            return bool(gpu_nodes) and {p["spec"].get("nodeName") for p in pods} == gpu_nodes

        wait_for("an exporter pod on each GPU node", on_every_gpu_node, timeout=60)
        name = f"{release.name}-slm-monitoring-dcgm-exporter"
        cluster.kubectl("get", f"configmap/{name}-counters", f"servicemonitor/{name}", "-n", gpu_namespace)
        assert not cluster.kubectl_json("get", "daemonsets", "-n", operator_namespace)["items"]
        operator = cluster.kubectl_json("get", "deployment", release.operator, "-n", operator_namespace)
        assert operator["status"].get("availableReplicas") == 1
    finally:
        release.helm("uninstall", release.name, "--wait", check=False)
        cluster.kubectl("delete", "namespace", operator_namespace, gpu_namespace, "--wait=false", check=False)
