"""Faults of the platform (issue 23.5): the API server restarted in the middle of the operator's work, etcd
frozen for 10 s, and a watch that resumes from a resourceVersion etcd no longer has (410 Gone). Each time
the operator, never restarted, converges: every SLMDeployment Ready with exactly its children, none twice,
none left behind.

These tests restart and freeze parts of the control plane, so they run on a control plane of their own
(started here from the pinned binaries, whatever `--existing-kubeconfig` says: kind's etcd is not ours to
freeze). The operator's periodic full resync is set far beyond the test, so what converges is the work of
its watches and retries, not a resync that would hide a lost watch.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slm_devtools.cluster import LocalCluster, wait_for
from slm_devtools.operator_process import OperatorProcess, install_crd
from slm_operator.kube import Kube
from tests.e2e.test_operator import CHILD_KINDS, condition, minimal

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EXPECTED_KINDS = ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "Service",
                  "ServiceMonitor"]
NO_RESYNC_SECONDS = 3600


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster.start(tmp_path_factory.mktemp("faults-cluster"), timeout=180) as cluster:
        install_crd(cluster)
        cluster.install_prometheus_operator_crds()
        yield cluster


@pytest.fixture(scope="module")
def operator(plane: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    process = OperatorProcess(plane.kubeconfig, tmp_path_factory.mktemp("faults-operator"),
                              resync_seconds=NO_RESYNC_SECONDS, verbose=True)
    process.start()
    yield process
    process.stop()


def parents(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    return kube.list("SLMDeployment", namespace)


def reconciled(kube: Kube, namespace: str) -> int:
    """How many SLMDeployments of `namespace` have a status for their current generation."""
    return sum(1 for p in parents(kube, namespace)
               if (p.get("status") or {}).get("observedGeneration") == p["metadata"]["generation"])


def apply_batch(plane: LocalCluster, namespace: str, names: list[str]) -> None:
    plane.kubectl("apply", "-n", namespace, "-f", "-",
                  input="\n---\n".join(minimal(name, replicas=1) for name in names))


def wait_children_started(plane: LocalCluster, kube: Kube, namespace: str) -> None:
    """Until the operator has written its first child of the batch (it is in the middle of its work)."""
    wait_for("the operator's first child", lambda: bool(kube.list("Deployment", namespace)), timeout=60,
             interval=0.02)


def assert_converged(plane: LocalCluster, operator: OperatorProcess, namespace: str, names: list[str],
                     timeout: float = 420) -> None:
    """Every SLMDeployment in `names` Ready for its generation; each has each child kind exactly once,
    owned by it alone; nothing is owned by an SLMDeployment that no longer exists; one ReplicaSet per
    Deployment (no rollout the faults caused) and one pod per replica."""

    def all_ready() -> bool:
        items = plane.kubectl_json("get", "slmd", "-n", namespace)["items"]
        return sorted(o["metadata"]["name"] for o in items) == sorted(names) and all(
            condition(o, "Ready").get("status") == "True"
            and o["status"].get("observedGeneration") == o["metadata"]["generation"] for o in items)

    def not_ready() -> str:
        items = plane.kubectl_json("get", "slmd", "-n", namespace)["items"]
        return "\n".join(f"{o['metadata']['name']} generation {o['metadata']['generation']}: "
                         f"{json.dumps(o.get('status', {}).get('conditions'))}" for o in items
                         if condition(o, "Ready").get("status") != "True"
                         or o["status"].get("observedGeneration") != o["metadata"]["generation"])

    # The deadline is generous: with the suite spread over workers, this cluster shares the machine's cores.
    wait_for(f"{len(names)} SLMDeployments Ready", all_ready, timeout=timeout, interval=1,
             on_timeout=lambda: f"{not_ready()}\n{operator.tail(40)}")
    uids = {o["metadata"]["name"]: o["metadata"]["uid"]
            for o in plane.kubectl_json("get", "slmd", "-n", namespace)["items"]}

    def owned_children() -> list[dict[str, Any]]:
        return list(plane.kubectl_json("get", CHILD_KINDS, "-n", namespace, "-l",
                                       "app.kubernetes.io/managed-by=slm-operator")["items"])

    wait_for("the garbage collector to remove the children of deleted SLMDeployments", lambda: all(
        c["metadata"]["ownerReferences"][0]["uid"] in uids.values() for c in owned_children()), timeout=90)
    per_parent = Counter((c["metadata"]["labels"]["slm.dev/deployment"], c["kind"]) for c in owned_children())
    duplicated = {key: count for key, count in per_parent.items() if count != 1}
    assert not duplicated, duplicated
    for name in names:
        assert sorted(kind for (parent, kind) in per_parent if parent == name) == EXPECTED_KINDS, name
    for child in owned_children():
        parent = child["metadata"]["labels"]["slm.dev/deployment"]
        assert [o["uid"] for o in child["metadata"]["ownerReferences"]] == [uids[parent]], child["metadata"]

    def replica_sets() -> Counter[str]:
        return Counter(o["metadata"]["ownerReferences"][0]["name"] for o in plane.kubectl_json(
            "get", "replicasets", "-n", namespace)["items"] if not o["metadata"].get("deletionTimestamp"))

    def pods() -> list[str]:
        return sorted(p["metadata"]["labels"]["app.kubernetes.io/instance"] for p in plane.kubectl_json(
            "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/name=slm-server")["items"]
            if not p["metadata"].get("deletionTimestamp"))

    # The ReplicaSets and pods of a deleted SLMDeployment go with the garbage collector, a moment later.
    wait_for("one ReplicaSet and one pod per SLMDeployment", lambda: set(replica_sets()) == set(names)
             and pods() == sorted(names), timeout=60, on_timeout=lambda: f"{replica_sets()} {pods()}")
    assert replica_sets() == dict.fromkeys(names, 1), "a second ReplicaSet: the faults caused a rollout"
    assert operator.starts == 1 and operator.proc is not None and operator.proc.poll() is None, "operator restarted"


def test_api_server_restart_in_the_middle_of_a_reconcile(plane: LocalCluster, operator: OperatorProcess) -> None:
    namespace = plane.new_namespace("restart")
    kube = Kube(plane.api_client())
    names = [f"restart-{i:02d}" for i in range(20)]
    apply_batch(plane, namespace, names)
    wait_children_started(plane, kube, namespace)
    in_flight = len(names) - reconciled(kube, namespace)
    plane.restart_apiserver()
    assert in_flight > 0, "the operator had finished before the restart: nothing was interrupted"
    assert_converged(plane, operator, namespace, names)


def test_etcd_paused_for_10_seconds_in_the_middle_of_a_reconcile(plane: LocalCluster,
                                                                  operator: OperatorProcess) -> None:
    namespace = plane.new_namespace("etcd-pause")
    kube = Kube(plane.api_client())
    names = [f"pause-{i:02d}" for i in range(20)]
    apply_batch(plane, namespace, names)
    wait_children_started(plane, kube, namespace)
    in_flight = len(names) - reconciled(kube, namespace)
    paused_at = time.monotonic()
    with plane.etcd_paused():
        time.sleep(10)  # the length of the fault itself (issue 23.5), not a wait for a result
    assert time.monotonic() - paused_at >= 10
    assert in_flight > 0, "the operator had finished before etcd froze: nothing was interrupted"
    assert_converged(plane, operator, namespace, names)


def test_a_watch_that_resumes_after_its_history_was_compacted_relists(plane: LocalCluster,
                                                                      operator: OperatorProcess) -> None:
    """While the operator is frozen, resources are created, edited and deleted, the API server restarts
    (every watch is cut, its watch cache rebuilt) and etcd compacts its history: the operator's watches
    resume from a resourceVersion that no longer exists and get 410 Gone. It must list again and act on
    all three changes, without a resync (its period is an hour here) and without a restart."""
    namespace = plane.new_namespace("expired")
    kube = Kube(plane.api_client())
    apply_batch(plane, namespace, ["kept", "edited", "gone"])
    assert_converged(plane, operator, namespace, ["kept", "edited", "gone"])
    log = Path(operator.log_path)
    restarts_before = log.read_text().count("Restarting the watch-stream for slmdeployments")
    rule_before = kube.get("PrometheusRule", namespace, "edited")
    assert rule_before is not None and "0.37" not in json.dumps(rule_before["spec"])

    with operator.paused():
        apply_batch(plane, namespace, ["created"])
        plane.kubectl("patch", "slmd", "edited", "-n", namespace, "--type=merge",
                      "-p", json.dumps({"spec": {"monitoring": {"alerts": {"errorRate": {"threshold": 0.37}}}}}))
        plane.kubectl("delete", "slmd", "gone", "-n", namespace, "--wait=true")
        plane.restart_apiserver()
        compacted_at = plane.compact_etcd()
    assert compacted_at > int(rule_before["metadata"]["resourceVersion"])

    wait_for("the operator's watch of SLMDeployments to get 410 and restart", lambda: log.read_text().count(
        "Restarting the watch-stream for slmdeployments") > restarts_before, timeout=120,
        on_timeout=lambda: operator.tail(40))
    wait_for("the edit in the PrometheusRule", lambda: "0.37" in json.dumps(
        (kube.get("PrometheusRule", namespace, "edited") or {}).get("spec")), timeout=120,
        on_timeout=lambda: operator.tail(40))
    assert_converged(plane, operator, namespace, ["kept", "edited", "created"])
