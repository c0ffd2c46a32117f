"""The operator as users meet it: a real process against a real API server (controller-manager for
garbage collection, scheduler, KWOK GPU nodes), driven with kubectl and the files in examples/.

Runs the same on kind: `pytest tests/e2e --existing-kubeconfig ~/.kube/kind-slm`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from slm_devtools.cluster import FAKE_NODE_SELECTOR, FAKE_NODE_TOLERATION, ClusterBase, wait_for
from tests.operator.process import REPO, OperatorProcess, install_crd

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EXAMPLES = REPO / "examples"
CHILD_KINDS = "deployments,services,poddisruptionbudgets,networkpolicies,configmaps,servicemonitors,prometheusrules"


@pytest.fixture(scope="module")
def operator_process(cluster: ClusterBase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator (python -m slm_operator) watching all namespaces, resync every 3 s."""
    install_crd(cluster)
    cluster.install_prometheus_operator_crds()
    process = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator"), resync_seconds=3)
    process.start()
    yield process
    process.stop()


def slmd(cluster: ClusterBase, namespace: str, name: str) -> dict[str, Any]:
    return dict(cluster.kubectl_json("get", "slmd", name, "-n", namespace))


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


def wait_condition(cluster: ClusterBase, namespace: str, name: str, type_: str, status: str,
                   reason: str | None = None, timeout: float = 60) -> dict[str, Any]:
    def holds() -> bool:
        cond = condition(slmd(cluster, namespace, name), type_)
        return cond.get("status") == status and (reason is None or cond.get("reason") == reason)

    wait_for(f"{namespace}/{name} {type_}={status} {reason or ''}", holds, timeout=timeout,
             on_timeout=lambda: json.dumps(slmd(cluster, namespace, name).get("status"), indent=1))
    return slmd(cluster, namespace, name)


# Test pods run on the fake nodes only: on kind those are tainted, and kind's own node must get no test pod.
ON_FAKE_NODES = {"nodeSelector": FAKE_NODE_SELECTOR, "tolerations": [FAKE_NODE_TOLERATION]}


def apply_example(cluster: ClusterBase, namespace: str, file: str, patch: dict[str, Any] | None = None) -> str:
    obj = yaml.safe_load((EXAMPLES / file).read_text())
    spec = obj["spec"]
    spec["nodeSelector"] = {**spec.get("nodeSelector", {}), **FAKE_NODE_SELECTOR}
    spec["tolerations"] = [*spec.get("tolerations", []), FAKE_NODE_TOLERATION]
    if patch:
        spec.update(patch)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))
    return str(obj["metadata"]["name"])


def minimal(name: str, **spec: Any) -> str:
    """A small SLMDeployment; CPU-only unless `resources` says otherwise (the cluster has 8 fake GPUs), and
    asking for little scratch disk, as a tiny model would (the fake nodes have 500Gi each)."""
    resources = {"gpus": 0, "modelCacheSizeLimit": "1Gi", "tmpSizeLimit": "256Mi"}
    return json.dumps({"apiVersion": "slm.dev/v1alpha1", "kind": "SLMDeployment", "metadata": {"name": name},
                       "spec": {"model": {"name": "org/model"}, "resources": resources, **ON_FAKE_NODES, **spec}})


def children(cluster: ClusterBase, namespace: str, parent: str | None = None) -> list[dict[str, Any]]:
    selector = "app.kubernetes.io/managed-by=slm-operator" + (f",slm.dev/deployment={parent}" if parent else "")
    items = cluster.kubectl_json("get", CHILD_KINDS, "-n", namespace, "-l", selector)["items"]
    return list(items)


def test_example_reaches_ready_with_every_child_owned(cluster: ClusterBase, operator_process: OperatorProcess,
                                                      namespace: str) -> None:
    started = time.monotonic()
    name = apply_example(cluster, namespace, "phi-mini.yaml")
    obj = wait_condition(cluster, namespace, name, "Ready", "True", "AllReplicasReady", timeout=90)
    assert obj["status"]["phase"] == "Ready" and obj["status"]["readyReplicas"] == 2
    assert obj["status"]["endpoint"] == f"http://{name}.{namespace}.svc:8000"
    kinds = sorted(c["kind"] for c in children(cluster, namespace, name))
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "Service",
                     "ServiceMonitor"]
    # Every monitor rendered and applied: a renderer's failure (RenderError) would show here.
    assert (condition(obj, "MonitoringReady")["status"], condition(obj, "MonitoringReady")["reason"]) == (
        "True", "MonitorsApplied")
    assert condition(obj, "SettingsApplied")["status"] == "True"
    for child in children(cluster, namespace, name):
        assert [o["uid"] for o in child["metadata"]["ownerReferences"]] == [obj["metadata"]["uid"]]
    # The pods passed the namespace's restricted Pod Security admission and landed on GPU nodes.
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}")["items"]
    assert len(pods) == 2
    for pod in pods:
        node = cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
        assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
    # `kubectl get slmd` shows the printer columns.
    table = cluster.kubectl("get", "slmd", "-n", namespace).stdout
    assert table.split("\n")[0].split() == ["NAME", "MODEL", "REPLICAS", "READY", "PHASE", "AGE"]
    assert "microsoft/Phi-3-mini-4k-instruct" in table and "Ready" in table
    events = cluster.kubectl_json("get", "events", "-n", namespace,
                                  "--field-selector", f"involvedObject.name={name},involvedObject.kind=SLMDeployment")
    assert any(e["reason"] == "Applied" for e in events["items"])
    print(f"apply -> Ready: {time.monotonic() - started:.1f}s")


def test_threshold_edit_reaches_the_prometheus_rule_within_seconds(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("edit-me"))
    wait_for("the PrometheusRule", lambda: cluster.kubectl("get", "prometheusrule", "edit-me", "-n", namespace,
                                                           check=False).returncode == 0, timeout=30)
    started = time.monotonic()
    cluster.kubectl("patch", "slmd", "edit-me", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"monitoring": {"alerts": {"errorRate": {"threshold": 0.37}}}}}))

    def updated() -> bool:
        rule = cluster.kubectl_json("get", "prometheusrule", "edit-me", "-n", namespace)
        return "0.37" in json.dumps(rule["spec"])

    wait_for("the new threshold in the PrometheusRule", updated, timeout=5, interval=0.05)
    print(f"threshold edit -> rule updated: {time.monotonic() - started:.2f}s")
    obj = wait_condition(cluster, namespace, "edit-me", "Ready", "True")
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]


def test_children_deleted_or_edited_by_hand_are_restored(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("drift", replicas=1))
    wait_condition(cluster, namespace, "drift", "Ready", "True")
    before = {c["kind"]: c["metadata"]["uid"] for c in children(cluster, namespace, "drift")}

    cluster.kubectl("delete", "deployment,prometheusrule,service", "drift", "-n", namespace)
    cluster.kubectl("scale", "deployment", "drift", "-n", namespace, "--replicas=3", check=False)

    def restored() -> bool:
        now = {c["kind"]: c["metadata"]["uid"] for c in children(cluster, namespace, "drift")}
        return set(now) == set(before) and all(now[k] != before[k] for k in ("Deployment", "PrometheusRule",
                                                                           "Service"))

    wait_for("deleted children to come back", restored, timeout=20)
    # A hand edit of an owned field is reverted (server-side apply with force).
    cluster.kubectl("patch", "pdb", "drift", "-n", namespace, "--type=merge", "-p", '{"spec":{"maxUnavailable":5}}')
    cluster.kubectl("label", "service", "drift", "-n", namespace, "app.kubernetes.io/part-of=someone-else",
                    "--overwrite")

    def reverted() -> bool:
        pdb = cluster.kubectl_json("get", "pdb", "drift", "-n", namespace)
        svc = cluster.kubectl_json("get", "service", "drift", "-n", namespace)
        return pdb["spec"]["maxUnavailable"] == 1 and svc["metadata"]["labels"]["app.kubernetes.io/part-of"] == \
            "slm-monitoring"

    wait_for("hand edits to be reverted", reverted, timeout=20)


def test_deleting_the_slmdeployment_removes_everything_it_owns(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("short-lived"))
    wait_for("children", lambda: len(children(cluster, namespace, "short-lived")) >= 5, timeout=30)
    cluster.kubectl("delete", "slmd", "short-lived", "-n", namespace, "--wait=true", "--timeout=30s")
    wait_for("garbage collection of the children", lambda: children(cluster, namespace, "short-lived") == [],
             timeout=60)


def test_scale_subresource_drives_the_deployment(cluster: ClusterBase, operator_process: OperatorProcess,
                                                  namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("scaled", replicas=1))
    wait_condition(cluster, namespace, "scaled", "Ready", "True")
    cluster.kubectl("scale", "slmd", "scaled", "-n", namespace, "--replicas=3")
    obj = wait_condition(cluster, namespace, "scaled", "Ready", "True", timeout=60)
    wait_for("3 ready replicas", lambda: slmd(cluster, namespace, "scaled")["status"]["readyReplicas"] == 3,
             timeout=60)
    assert obj["status"]["selector"] == "app.kubernetes.io/instance=scaled,app.kubernetes.io/name=slm-server"


def test_no_node_can_satisfy_the_gpu_request_is_a_condition_not_a_crash(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("too-big", resources={"gpus": 8}))
    obj = wait_condition(cluster, namespace, "too-big", "Ready", "False", "InsufficientGPU")
    assert obj["status"]["phase"] == "Failed"
    assert "spec.resources.gpus=8" in condition(obj, "Degraded")["message"]
    events = cluster.kubectl_json("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=too-big")
    assert any(e["type"] == "Warning" and e["reason"] == "InsufficientGPU" for e in events["items"])
    # No exception loop: further resyncs of it succeed.
    errors_before = operator_process.sum_of("slm_operator_reconcile_errors_total")
    resyncs = operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
    wait_for("two more resyncs", lambda: operator_process.sum_of("slm_operator_reconciles_total",
                                                                  trigger="resync") >= resyncs + 2, timeout=20)
    assert operator_process.sum_of("slm_operator_reconcile_errors_total") == errors_before


def test_missing_secret_is_reported_then_resolved(cluster: ClusterBase, operator_process: OperatorProcess,
                                                  namespace: str) -> None:
    name = apply_example(cluster, namespace, "with-notifications.yaml")
    obj = wait_condition(cluster, namespace, name, "MonitoringReady", "False", "SecretNotFound")
    assert "spec.monitoring.notifications.slack.apiURLSecretRef" in condition(obj, "MonitoringReady")["message"]
    for secret, key in (("slack", "url"), ("smtp", "password"), ("hook", "url")):
        cluster.kubectl("create", "secret", "generic", secret, "-n", namespace, f"--from-literal={key}=https://x.invalid")
    wait_condition(cluster, namespace, name, "MonitoringReady", "True")
    amc = cluster.kubectl_json("get", "alertmanagerconfig", name, "-n", namespace)
    assert "https://x.invalid" not in json.dumps(amc)  # referenced, never copied


def test_kube_prometheus_stack_selectors_are_honoured(cluster: ClusterBase, operator_process: OperatorProcess,
                                                      namespace: str) -> None:
    prometheus = {"apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
                  "metadata": {"name": "kps", "namespace": namespace},
                  "spec": {"serviceMonitorSelector": {"matchLabels": {"release": "kps"}},
                           "ruleSelector": {"matchLabels": {"release": "kps"}}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(prometheus))
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("selected"))
        wait_for("the release label on the ServiceMonitor and the PrometheusRule", lambda: all(
            cluster.kubectl_json("get", kind, "selected", "-n", namespace)["metadata"]["labels"].get("release") == "kps"
            for kind in ("servicemonitor", "prometheusrule")), timeout=30)
        mismatch = minimal("mismatch", monitoring={"prometheus": {"serviceMonitorLabels": {"team": "ml"}}})
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=mismatch)
        obj = wait_condition(cluster, namespace, "mismatch", "MonitoringReady", "False", "PrometheusSelectorMismatch")
        assert f"{namespace}/kps" in condition(obj, "MonitoringReady")["message"]
    finally:
        cluster.kubectl("delete", "prometheus", "kps", "-n", namespace, check=False)


@pytest.mark.parametrize(("spec", "field"), [
    ({"monitoring": {"alerts": {"errorRate": {"threshold": 1.5}}}}, "spec.monitoring.alerts.errorRate.threshold"),
    ({"monitoring": {"alerts": {"latencyP95": {"for": "5 minutes"}}}}, "spec.monitoring.alerts.latencyP95.for"),
    ({"monitoring": {"alerts": {"gpuMemory": {"severity": "page"}}}}, "spec.monitoring.alerts.gpuMemory.severity"),
    ({"monitoring": {"alerts": {"disabled": ["HighErrorRate"]}}}, "spec.monitoring.alerts.disabled[0]"),
    ({"resources": {"gpus": -1}}, "spec.resources.gpus"),
    ({"replicas": 1000}, "spec.replicas"),
    ({"monitoring": {"scrapeInterval": "often"}}, "spec.monitoring.scrapeInterval"),
    ({"resources": {"requests": {"nvidia.com/gpu": 1}}}, "spec.resources"),
    ({"model": {}}, "spec.model.name"),
    ({"resources": {"gpus": 0, "requests": {"cpu": "abc"}}}, "spec.resources.requests"),
    ({"resources": {"gpus": 0, "tmpSizeLimit": "lots"}}, "spec.resources.tmpSizeLimit"),
])
def test_invalid_resources_are_refused_with_the_field_named(cluster: ClusterBase, operator_process: OperatorProcess,
                                                           namespace: str, spec: dict[str, Any], field: str) -> None:
    obj = json.loads(minimal("invalid"))
    obj["spec"].update(spec)
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(obj),
                             check=False)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def test_a_resync_of_unchanged_resources_writes_nothing(cluster: ClusterBase, operator_process: OperatorProcess,
                                                        namespace: str) -> None:
    for i in range(3):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal(f"quiet-{i}"))
    for i in range(3):
        wait_condition(cluster, namespace, f"quiet-{i}", "Ready", "True")
    # The write counter is the operator process's: earlier tests' namespaces, deleted without
    # waiting, must be gone first (their objects' deletion makes the operator report and write).
    wait_for("earlier tests' namespaces to be deleted", lambda: not cluster.kubectl(
        "get", "namespaces", "-o", "jsonpath={.items[?(@.status.phase=='Terminating')].metadata.name}",
    ).stdout.split(), timeout=120)

    def writes() -> dict[str, float]:
        return {key: value for key, value in operator_process.metrics().items()
                if key.startswith("slm_operator_api_writes_total")}

    def settled() -> bool:
        # Two consecutive full resyncs with no write in between.
        before = writes()
        resyncs = operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
        wait_for("a full resync", lambda: operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
                 >= resyncs + 3, timeout=20)
        return writes() == before

    wait_for("the operator to settle", settled, timeout=60, interval=0)
    before = writes()
    skipped = operator_process.sum_of("slm_operator_apply_skipped_total")
    resyncs = operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
    wait_for("three more resync rounds", lambda: operator_process.sum_of(
        "slm_operator_reconciles_total", trigger="resync") >= resyncs + 9, timeout=30)
    after = writes()
    assert after == before, (
        {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key)},
        operator_process.tail(),
    )
    assert operator_process.sum_of("slm_operator_apply_skipped_total") > skipped  # it did look


def test_missing_prometheus_operator_crds_then_installed_without_restart(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    cluster.uninstall_prometheus_operator_crds()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("no-crds"))
        obj = wait_condition(cluster, namespace, "no-crds", "MonitoringReady", "False", "PrometheusOperatorCRDsMissing")
        assert "servicemonitors.monitoring.coreos.com" in condition(obj, "MonitoringReady")["message"]
        wait_condition(cluster, namespace, "no-crds", "Ready", "True")  # serving does not wait for monitoring
        starts = operator_process.starts
    finally:
        cluster.install_prometheus_operator_crds()
    wait_condition(cluster, namespace, "no-crds", "MonitoringReady", "True", timeout=60)
    wait_for("the ServiceMonitor and PrometheusRule", lambda: all(
        cluster.kubectl("get", kind, "no-crds", "-n", namespace, check=False).returncode == 0
        for kind in ("servicemonitor", "prometheusrule")), timeout=30)
    assert operator_process.starts == starts and operator_process.proc is not None
    assert operator_process.proc.poll() is None


@pytest.mark.slow
def test_sigkill_while_50_resources_are_created_converges_without_duplicates_or_orphans(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    import random

    rng = random.Random(7)  # reproducible kill points
    names = [f"chaos-{i:02d}" for i in range(50)]
    for start in range(0, 50, 10):  # five batches of ten, the operator killed after each
        batch = "\n---\n".join(minimal(n) for n in names[start:start + 10])
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=batch)
        time.sleep(rng.uniform(0.0, 1.5))  # a random point in the middle of the operator's work
        operator_process.kill()
        operator_process.start()
    # A few deleted while the operator was down: their children must be collected, not recreated.
    operator_process.kill()
    cluster.kubectl("delete", "slmd", *names[:5], "-n", namespace, "--wait=true")
    operator_process.start()
    alive = names[5:]

    def converged() -> bool:
        items = cluster.kubectl_json("get", "slmd", "-n", namespace)["items"]
        ready = [o for o in items if condition(o, "Ready").get("status") == "True"]
        return len(items) == len(alive) and len(ready) == len(alive)

    wait_for("all 45 SLMDeployments Ready", converged, timeout=180, interval=1)
    uids = {o["metadata"]["name"]: o["metadata"]["uid"] for o in cluster.kubectl_json("get", "slmd", "-n",
                                                                                      namespace)["items"]}

    def no_orphans() -> bool:
        owned = children(cluster, namespace)
        return all(c["metadata"]["ownerReferences"][0]["uid"] in uids.values() for c in owned)

    wait_for("garbage collection of the deleted ones' children", no_orphans, timeout=60, interval=1)
    owned = children(cluster, namespace)
    per_parent: dict[tuple[str, str], int] = {}
    for child in owned:
        key = (child["metadata"]["labels"]["slm.dev/deployment"], child["kind"])
        per_parent[key] = per_parent.get(key, 0) + 1
        assert child["metadata"]["ownerReferences"][0]["uid"] == uids[key[0]]
    assert all(count == 1 for count in per_parent.values())
    assert {name for name, _ in per_parent} == set(alive)
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/name=slm-server")["items"]
    assert len([p for p in pods if not p["metadata"].get("deletionTimestamp")]) == len(alive)


def test_an_unmanaged_object_with_a_child_name_is_not_taken_over(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    """Issue 23.1, on the triggers that once took it over: the first spec edit (an update with a cold
    cache), and the deletion of the SLMDeployment (garbage collection follows ownerReferences)."""
    cluster.kubectl("create", "service", "clusterip", "taken", "-n", namespace, "--tcp=80:8080")
    before = cluster.kubectl_json("get", "service", "taken", "-n", namespace)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("taken"))
    obj = wait_condition(cluster, namespace, "taken", "Ready", "False", "NameConflict")
    assert f"Service {namespace}/taken" in condition(obj, "Ready")["message"]
    assert cluster.kubectl("get", "deployment", "taken", "-n", namespace, check=False).returncode == 0

    generation = obj["metadata"]["generation"]
    cluster.kubectl("patch", "slmd", "taken", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":2}}')
    wait_for("the edit to be reconciled", lambda: slmd(cluster, namespace, "taken")["status"].get(
        "observedGeneration") == generation + 1, timeout=30)
    obj = wait_condition(cluster, namespace, "taken", "Ready", "False", "NameConflict")
    service = cluster.kubectl_json("get", "service", "taken", "-n", namespace)
    assert "ownerReferences" not in service["metadata"]
    assert service["spec"]["selector"] == before["spec"]["selector"]
    assert [p["port"] for p in service["spec"]["ports"]] == [80]
    assert service["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # not written at all

    cluster.kubectl("delete", "slmd", "taken", "-n", namespace, "--wait=true", "--timeout=30s")
    wait_for("our Deployment to be collected", lambda: cluster.kubectl(
        "get", "deployment", "taken", "-n", namespace, check=False).returncode != 0, timeout=60)
    assert cluster.kubectl_json("get", "service", "taken", "-n", namespace)["metadata"]["uid"] == before[
        "metadata"]["uid"]


def test_a_foreign_config_map_is_not_taken_over_when_dashboards_are_switched_on(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "dash-dashboard", "-n", namespace, "--from-literal=mine=yes")
    before = cluster.kubectl_json("get", "configmap", "dash-dashboard", "-n", namespace)
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=minimal("dash", monitoring={"dashboards": {"enabled": False}}))
    wait_condition(cluster, namespace, "dash", "MonitoringReady", "True")
    cluster.kubectl("patch", "slmd", "dash", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"monitoring":{"dashboards":{"enabled":true}}}}')
    obj = wait_condition(cluster, namespace, "dash", "MonitoringReady", "False", "NameConflict")
    assert f"ConfigMap {namespace}/dash-dashboard" in condition(obj, "MonitoringReady")["message"]
    after = cluster.kubectl_json("get", "configmap", "dash-dashboard", "-n", namespace)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["data"] == {"mine": "yes"} and "ownerReferences" not in after["metadata"]


def test_writes_never_land_on_an_object_that_changed_hands(cluster: ClusterBase, namespace: str) -> None:
    """The API server itself refuses the operator's write when the object it read was replaced
    (the apply names the uid) or when the name it meant to create was taken (a create is a POST)."""
    from slm_operator.kube import Kube, OwnershipChanged

    kube = Kube(cluster.api_client())
    desired = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "raced", "namespace": namespace},
               "data": {"ours": "1"}}
    outcome, ours = kube.apply_object(desired, live=None)
    assert outcome == "created" and ours is not None
    # Recorded as applied by our field manager: a field we stop setting is removed by the next apply.
    assert [(m["manager"], m["operation"]) for m in ours["metadata"]["managedFields"]] == [("slm-operator", "Apply")]
    cluster.kubectl("delete", "configmap", "raced", "-n", namespace)
    cluster.kubectl("create", "configmap", "raced", "-n", namespace, "--from-literal=theirs=1")
    with pytest.raises(OwnershipChanged):
        kube.apply_object({**desired, "data": {"ours": "2"}}, live=ours)  # decided on the deleted one
    with pytest.raises(OwnershipChanged):
        kube.apply_object(desired, live=None)  # decided when the name was free
    assert cluster.kubectl_json("get", "configmap", "raced", "-n", namespace)["data"] == {"theirs": "1"}


def test_items_another_manager_adds_to_our_service_cause_no_write_loop(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    """A mesh or a colleague adds a port to our Service with its own field manager; it is theirs, it stays,
    and the operator must not rewrite the Service on every resync because the port lists differ in length."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("shared"))
    wait_condition(cluster, namespace, "shared", "Ready", "True")
    extra = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shared", "namespace": namespace},
             "spec": {"ports": [{"name": "debug", "port": 9000, "protocol": "TCP"}]}}
    cluster.kubectl("apply", "--server-side", "--field-manager=mesh", "-f", "-", input=json.dumps(extra))
    service_writes = 'slm_operator_api_writes_total{kind="Service",verb="apply"}'
    resyncs = operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
    wait_for("a resync", lambda: operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
             >= resyncs + 1, timeout=20)
    before = operator_process.metrics().get(service_writes, 0)
    resyncs = operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
    wait_for("three more resyncs", lambda: operator_process.sum_of("slm_operator_reconciles_total",
                                                                   trigger="resync") >= resyncs + 3, timeout=30)
    assert operator_process.metrics().get(service_writes, 0) == before
    ports = {p["name"] for p in cluster.kubectl_json("get", "service", "shared", "-n", namespace)["spec"]["ports"]}
    assert ports == {"http", "debug"}


def test_a_child_the_api_server_refuses_is_reported_as_invalid_spec_without_a_retry_loop(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    """Issue 23.2: a request above its limit passes the CRD but the API server refuses the Deployment."""
    resources = {"gpus": 0, "modelCacheSizeLimit": "1Gi", "tmpSizeLimit": "256Mi",
                 "requests": {"cpu": "2"}, "limits": {"cpu": "1"}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=minimal("refused", resources=resources))
    obj = wait_condition(cluster, namespace, "refused", "Ready", "False", "InvalidSpec")
    message = condition(obj, "Ready")["message"]
    assert f"Deployment {namespace}/refused" in message and "must be less than or equal to cpu limit" in message
    assert obj["status"]["phase"] == "Failed"
    errors = operator_process.sum_of("slm_operator_reconcile_errors_total")
    resyncs = operator_process.sum_of("slm_operator_reconciles_total", trigger="resync")
    wait_for("two more resyncs", lambda: operator_process.sum_of("slm_operator_reconciles_total",
                                                                 trigger="resync") >= resyncs + 2, timeout=20)
    assert operator_process.sum_of("slm_operator_reconcile_errors_total") == errors  # no error, no kopf retry
    cluster.kubectl("patch", "slmd", "refused", "-n", namespace, "--type=json",
                    "-p", '[{"op":"remove","path":"/spec/resources/limits"}]')
    wait_condition(cluster, namespace, "refused", "Ready", "True")


def test_fault_injection_and_full_outputs_need_the_operators_allow_flags(
        cluster: ClusterBase, operator_process: OperatorProcess, namespace: str) -> None:
    """The operator process runs with the chart's defaults: neither flag set."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=minimal("gated", server={"faultsAdmin": True}, logging={"outputs": "full"}))
    obj = wait_condition(cluster, namespace, "gated", "SettingsApplied", "False", "FaultInjectionNotAllowed")
    assert "spec.logging.outputs" in condition(obj, "SettingsApplied")["message"]
    container = cluster.kubectl_json("get", "deployment", "gated", "-n", namespace)["spec"]["template"]["spec"][
        "containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "SLM_FAULTS_ADMIN" not in env and env["SLM_LOG_OUTPUTS"] == "hash"
    events = cluster.kubectl_json("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=gated")
    assert any(e["type"] == "Warning" and e["reason"] == "FaultInjectionNotAllowed" for e in events["items"])
