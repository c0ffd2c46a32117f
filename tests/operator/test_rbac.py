"""Least privilege, checked both ways: the chart's RBAC grants exactly the verbs the operator uses.

The operator's own verbs are recorded, not listed by hand: every request goes through Kube.request,
which notes the (group, resource, verb) it needs; the code paths below drive a reconcile through
every branch that talks to the API (create, resync, child repair, pruning, secret checks, status,
events). kopf's own verbs follow from the handlers registered in slm_operator.main: it lists and
watches every resource a handler names, patches its progress annotations on the resources it changes,
posts Events, watches CRDs, and — with --namespace only — namespaces (kopf/_core/reactor/observation.py).
The answers come from an in-memory API (see test_reconcile.py); the e2e tests in tests/chart run the
operator under these very rules against a real API server.
"""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

import slm_operator.main  # noqa: F401 - registers the kopf handlers whose resources are read below
from slm_operator.handlers import lifecycle
from slm_operator.handlers.reconcile import reconcile
from slm_operator.kube import rbac_of
from tests.chart.chartlib import documents, render
from tests.operator.test_reconcile import InMemoryApi, gpu_node, slmd, state_for

Rule = tuple[str, str, str]  # group, resource, verb
CLUSTER_SCOPED = {("", "nodes"), ("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")}


class RecordingApi(InMemoryApi):
    """Also notes whether each request was made in a namespace (Role) or across them (ClusterRole)."""

    def __init__(self) -> None:
        super().__init__()
        self.cluster_wide: set[tuple[str, str]] = set()

    def _send(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        needed = rbac_of(method, path)
        if needed is not None and "/namespaces/" not in path:
            self.cluster_wide.add(needed[:2])
        return super()._send(method, path, **kwargs)


def operator_verbs(namespaces: tuple[str, ...]) -> tuple[set[Rule], set[tuple[str, str]]]:
    api = RecordingApi()
    api.add(gpu_node(4))
    api.add({"apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus", "metadata": {
        "name": "kps", "namespace": "monitoring"}, "spec": {"serviceMonitorSelector": {}, "ruleSelector": {}}})
    for secret in ("hook", "hash-key"):
        api.add({"kind": "Secret", "metadata": {"name": secret, "namespace": "ns"}})
    state = state_for(api, namespaces=namespaces)
    body = slmd(monitoring={"notifications": {"webhook": {"urlSecretRef": {"name": "hook", "key": "url"}}}},
                logging={"outputHashKeySecretRef": {"name": "hash-key", "key": "k"}})
    api.add(body)
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="create")
    lifecycle.resync_once(state)
    deployment = copy.deepcopy(api.objects[("deployments", "ns", "m")])
    del api.objects[("deployments", "ns", "m")]
    lifecycle.child_event(state, "DELETED", deployment)  # reads its SLMDeployment, repairs
    for kind, plural in (("ServiceMonitor", "servicemonitors"), ("ConfigMap", "configmaps"),
                         ("NetworkPolicy", "networkpolicies")):
        state.children.put(api.objects[(plural, "ns", "m-dashboard" if kind == "ConfigMap" else "m")])
    parent = api.objects[("slmdeployments", "ns", "m")]
    parent["spec"]["monitoring"]["enabled"] = False
    parent["spec"]["networkPolicy"] = {"enabled": False}
    reconcile(state, parent, trigger="update")  # prunes
    assert "delete networkpolicies/m" in api.writes and "delete configmaps/m-dashboard" in api.writes
    lifecycle.on_slmdeployment_event(state, "DELETED", parent)
    return api.verbs_used, api.cluster_wide


def kopf_verbs(namespaced: bool) -> set[Rule]:
    registry = kopf.get_default_registry()
    verbs: set[Rule] = {("", "events", "create"), ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                        ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
    for handler in registry._watching.get_all_handlers():
        verbs |= {(handler.selector.group or "", handler.selector.any_name or "", v) for v in ("list", "watch")}
    for handler in registry._changing.get_all_handlers():
        selector = handler.selector
        verbs |= {(selector.group or "", selector.any_name or "", v) for v in ("list", "watch", "patch")}
    if namespaced:
        verbs |= {("", "namespaces", "list"), ("", "namespaces", "watch")}
    return verbs


def granted(docs: list[dict[str, Any]], kind: str) -> set[Rule]:
    return {
        (group, resource, verb)
        for doc in docs if doc["kind"] == kind and doc["metadata"]["name"].endswith("-operator")
        for rule in doc["rules"] for group in rule["apiGroups"] for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_cluster_wide_rbac_is_exactly_what_the_code_uses() -> None:
    used, _ = operator_verbs(())
    used |= kopf_verbs(namespaced=False)
    docs = documents(render())
    grants = granted(docs, "ClusterRole")
    assert grants - used == set(), "granted but never used"
    assert used - grants == set(), "used but not granted"
    assert not [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-operator")]


@pytest.mark.parametrize("secret_checks", [True, False])
def test_namespaced_rbac_splits_the_same_verbs_by_scope(secret_checks: bool) -> None:
    used, cluster_wide = operator_verbs(("ns",))
    used |= kopf_verbs(namespaced=True)
    if not secret_checks:
        used.discard(("", "secrets", "get"))
    cluster = {r for r in used if r[:2] in cluster_wide | CLUSTER_SCOPED}
    docs = documents(render(set_values=["operator.watchNamespaces={team-a}",
                                        f"rbac.secretReferenceChecks={str(secret_checks).lower()}"]))
    assert granted(docs, "ClusterRole") == cluster
    assert granted(docs, "Role") == used - cluster


def test_the_recording_sees_a_verb_the_chart_lacks() -> None:
    """The comparison can fail: a code path that starts deleting Deployments shows up as used."""
    api = RecordingApi()
    api.add({"kind": "Deployment", "metadata": {"name": "d", "namespace": "ns"}})
    api.delete("Deployment", "ns", "d")
    assert ("apps", "deployments", "delete") in api.verbs_used
    assert ("apps", "deployments", "delete") not in granted(documents(render()), "ClusterRole")
