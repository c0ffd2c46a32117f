"""The reconcile decisions, in a second, against an in-memory API.

A stand-in for the API server is used here only so the decision logic (what to write, what to skip,
what to prune, which condition) is pinned without a cluster; the very same behaviour is proven against
the real API server, controller-manager and garbage collector in tests/e2e/test_operator.py.
"""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes.client.exceptions import ApiException

from slm_operator.config import OperatorConfig
from slm_operator.handlers import lifecycle
from slm_operator.handlers.reconcile import reconcile
from slm_operator.handlers.state import State
from slm_operator.kube import RESOURCES, Kube

PLURAL_TO_KIND = {r.plural: k for k, r in RESOURCES.items()}


class InMemoryApi(Kube):
    """Kube with `request` answered from dicts: objects by (plural, namespace, name), a write log."""

    def __init__(self, *, monitoring_crds: bool = True) -> None:
        self.field_manager = "slm-operator"
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.writes: list[str] = []
        self.monitoring_crds = monitoring_crds

    def request(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None, body: Any = None,
                content_type: str = "application/json", timeout: float = 30.0) -> dict[str, Any]:
        parts = urlparse(path).path.strip("/").split("/")
        if parts[0] == "apis" and len(parts) == 3:  # discovery of a group-version
            if parts[1] == "monitoring.coreos.com" and not self.monitoring_crds:
                raise ApiException(status=404)
            plurals = [r.plural for r in RESOURCES.values() if r.api_version == f"{parts[1]}/{parts[2]}"]
            return {"resources": [{"name": p} for p in plurals]}
        parts = parts[2:] if parts[0] == "api" else parts[3:]
        namespace = None
        if parts[0] == "namespaces":
            namespace, parts = parts[1], parts[2:]
        plural, name, sub = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else None)
        if plural in ("servicemonitors", "prometheusrules", "alertmanagerconfigs", "prometheuses") and \
                not self.monitoring_crds:
            raise ApiException(status=404)
        key = (plural, namespace, name or "")
        if method == "GET" and name is None:
            return {"items": [copy.deepcopy(o) for (p, ns, _), o in self.objects.items()
                              if p == plural and namespace in (None, ns)]}
        if method == "GET":
            if key not in self.objects:
                raise ApiException(status=404)
            return copy.deepcopy(self.objects[key])
        if method == "POST":
            self.writes.append(f"create {plural}")
            return {}
        if method == "DELETE":
            if key not in self.objects:
                raise ApiException(status=404)
            del self.objects[key]
            self.writes.append(f"delete {plural}/{name}")
            return {}
        assert method == "PATCH"
        if sub == "status":
            self.objects[key]["status"] = {**self.objects[key].get("status", {}), **body["status"]}
            self.writes.append(f"status {name}")
            return {}
        assert content_type == "application/apply-patch+yaml" and parse_qs(urlparse("?" + "&".join(
            f"{k}={v}" for k, v in query or [])).query)["force"] == ["true"]
        live = self.objects.get(key, {})
        self.objects[key] = {**copy.deepcopy(body), "status": live.get("status", {})}
        self.writes.append(f"apply {plural}/{name}")
        return {}

    def add(self, obj: dict[str, Any]) -> None:
        plural = RESOURCES[obj["kind"]].plural
        self.objects[(plural, obj["metadata"].get("namespace"), obj["metadata"]["name"])] = obj


def slmd(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "slm.dev/v1alpha1", "kind": "SLMDeployment",
            "metadata": {"name": "m", "namespace": "ns", "uid": "u-1", "generation": 1},
            "spec": {"model": {"name": "org/m"}, "replicas": 1, "resources": {"gpus": 1}, **spec}}


def gpu_node(gpus: int) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": f"n{gpus}", "labels": {}}, "status": {"allocatable": {
        "nvidia.com/gpu": str(gpus)}}}


@pytest.fixture
def api() -> InMemoryApi:
    fake = InMemoryApi()
    fake.add(gpu_node(4))
    return fake


def state_for(api: InMemoryApi) -> State:
    return State(OperatorConfig(discovery_ttl_seconds=0), api)


def conditions(api: InMemoryApi) -> dict[str, tuple[str, str]]:
    status = api.objects[("slmdeployments", "ns", "m")]["status"]
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def run(api: InMemoryApi, state: State, cr: dict[str, Any]) -> None:
    api.add(cr)
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="test")


@pytest.mark.usefixtures("monitoring_renderers")
def test_second_pass_writes_nothing(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd())
    first = list(api.writes)
    assert "apply deployments/m" in first and "apply prometheusrules/m" in first and "status m" in first
    api.writes.clear()
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="resync")
    assert api.writes == []


@pytest.mark.usefixtures("monitoring_renderers")
def test_missing_crds_keep_serving_and_report_then_recover(api: InMemoryApi) -> None:
    api.monitoring_crds = False
    state = state_for(api)
    run(api, state, slmd())
    assert ("deployments", "ns", "m") in api.objects
    assert conditions(api)["MonitoringReady"] == ("False", "PrometheusOperatorCRDsMissing")
    api.monitoring_crds = True
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="resync")
    assert ("servicemonitors", "ns", "m") in api.objects
    assert conditions(api)["MonitoringReady"] == ("True", "MonitorsApplied")


@pytest.mark.usefixtures("monitoring_renderers")
def test_monitoring_switched_off_prunes_only_owned_objects(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd())
    for (plural, _, _), obj in list(api.objects.items()):
        if plural in ("servicemonitors", "prometheusrules", "configmaps"):
            state.children.put({**obj, "metadata": {**obj["metadata"], "uid": f"{plural}-uid"}})
    run(api, state, slmd(monitoring={"enabled": False}))
    assert ("servicemonitors", "ns", "m") not in api.objects
    assert ("configmaps", "ns", "m-dashboard") not in api.objects
    assert conditions(api)["MonitoringReady"] == ("True", "MonitorsApplied")


@pytest.mark.usefixtures("monitoring_renderers")
def test_gpu_request_no_node_can_meet_is_failed_not_raised(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd(resources={"gpus": 8}))
    assert conditions(api)["Ready"] == ("False", "InsufficientGPU")
    assert api.objects[("slmdeployments", "ns", "m")]["status"]["phase"] == "Failed"
    assert "create events" in api.writes  # a Warning Event says why


@pytest.mark.usefixtures("monitoring_renderers")
def test_missing_secret_is_a_condition_and_no_alertmanager_config(api: InMemoryApi) -> None:
    state = state_for(api)
    hook = {"notifications": {"webhook": {"urlSecretRef": {"name": "hook", "key": "url"}}}}
    run(api, state, slmd(monitoring=hook))
    assert conditions(api)["MonitoringReady"][1] == "SecretNotFound"
    assert ("alertmanagerconfigs", "ns", "m") not in api.objects
    api.add({"kind": "Secret", "metadata": {"name": "hook", "namespace": "ns"}, "data": {"url": "eA=="}})
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="resync")
    assert ("alertmanagerconfigs", "ns", "m") in api.objects
    assert "eA==" not in json.dumps(api.objects[("alertmanagerconfigs", "ns", "m")])


@pytest.mark.usefixtures("monitoring_renderers")
def test_child_events_repair_deletion_and_ignore_their_own_echo(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd())
    rule = copy.deepcopy(api.objects[("prometheusrules", "ns", "m")])
    api.writes.clear()
    lifecycle.child_event(state, "MODIFIED", rule)  # our own write echoing back
    assert api.writes == []
    del api.objects[("prometheusrules", "ns", "m")]
    lifecycle.child_event(state, "DELETED", rule)
    assert ("prometheusrules", "ns", "m") in api.objects
    edited = copy.deepcopy(api.objects[("prometheusrules", "ns", "m")])
    edited["spec"]["groups"] = []
    api.objects[("prometheusrules", "ns", "m")] = edited
    lifecycle.child_event(state, "MODIFIED", edited)
    assert api.objects[("prometheusrules", "ns", "m")]["spec"]["groups"] != []


@pytest.mark.usefixtures("monitoring_renderers")
def test_someone_elses_object_of_the_same_name_is_left_alone_and_reported(api: InMemoryApi) -> None:
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m", "namespace": "ns"},
              "spec": {"ports": [{"port": 80}]}}
    api.add(copy.deepcopy(theirs))
    state = state_for(api)
    run(api, state, slmd())
    assert api.objects[("services", "ns", "m")] == theirs
    assert "apply services/m" not in api.writes
    assert conditions(api)["Ready"] == ("False", "NameConflict")
    assert api.objects[("slmdeployments", "ns", "m")]["status"]["phase"] == "Failed"
