"""The reconcile decisions, in a second, against an in-memory API.

A stand-in for the API server is used here only so the decision logic (what to write, what to skip,
what to prune, which condition) is pinned without a cluster; the very same behaviour is proven against
the real API server, controller-manager and garbage collector in tests/e2e/test_operator.py.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from slm_operator.config import OperatorConfig
from slm_operator.handlers import lifecycle
from slm_operator.handlers.reconcile import reconcile
from slm_operator.handlers.state import State
from slm_operator.kube import RESOURCES, Kube

PLURAL_TO_KIND = {r.plural: k for k, r in RESOURCES.items()}


class InMemoryApi(Kube):
    """Kube whose HTTP exchange (`_send`) is answered from dicts: objects by (plural, namespace, name), a
    write log. Kube.request itself (retries, the record of verbs) runs as in production."""

    def __init__(self, *, monitoring_crds: bool = True) -> None:
        super().__init__(None, sleep=lambda _: None)  # type: ignore[arg-type]  # no HTTP client: _send answers
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.writes: list[str] = []
        self.secret_reads: list[str] = []  # the Accept header of every Secret read
        self.events: list[dict[str, Any]] = []  # every Event posted
        self.monitoring_crds = monitoring_crds
        self.reject: dict[str, str] = {}  # plural -> message of a 422 for every apply of it
        self.before_apply: list[Any] = []  # callbacks run before an apply lands (to race it)
        self._uids = 0
        self.down = False  # every request fails as with the API server restarting

    def _send(self, method: str, path: str, *, query: list[tuple[str, str]], body: Any, content_type: str,
              accept: str, timeout: float) -> dict[str, Any]:
        if self.down:
            raise urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
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
            if plural == "secrets":
                self.secret_reads.append(accept)
            if key not in self.objects:
                raise ApiException(status=404)
            if "as=PartialObjectMetadata" in accept:
                return {"kind": "PartialObjectMetadata", "metadata": copy.deepcopy(self.objects[key]["metadata"])}
            return copy.deepcopy(self.objects[key])
        if method == "POST":
            if plural == "events":
                self.writes.append("create events")
                self.events.append(copy.deepcopy(body))
                return {}
            key = (plural, namespace, body["metadata"]["name"])
            for hook in self.before_apply:
                hook(plural, key[2])
            if plural in self.reject:
                raise self._rejection(plural)
            if key in self.objects:
                raise ApiException(status=409, reason="Conflict", body=json.dumps(
                    {"kind": "Status", "reason": "AlreadyExists", "code": 409}))
            self._uids += 1
            self.objects[key] = {**copy.deepcopy(body), "metadata": {
                **copy.deepcopy(body["metadata"]), "uid": f"{plural}-uid-{self._uids}", "resourceVersion": "1",
                "managedFields": [{"manager": self.field_manager, "operation": "Update"}]}}
            self.writes.append(f"create {plural}/{key[2]}")
            return copy.deepcopy(self.objects[key])
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
        if content_type == "application/merge-patch+json":  # our field manager's entry, after a create
            assert set(body["metadata"]) == {"managedFields", "resourceVersion"}
            self.objects[key]["metadata"]["managedFields"] = body["metadata"]["managedFields"]
            self.writes.append(f"own {plural}/{name}")
            return copy.deepcopy(self.objects[key])
        assert content_type == "application/apply-patch+yaml" and parse_qs(urlparse("?" + "&".join(
            f"{k}={v}" for k, v in query or [])).query)["force"] == ["true"]
        for hook in self.before_apply:
            hook(plural, name)
        if plural in self.reject:
            raise self._rejection(plural)
        live = self.objects.get(key)
        uid = body["metadata"]["uid"]
        if live is None:  # the API server's answers to an apply that names a uid
            raise ApiException(status=409, reason="Conflict", body=json.dumps({"kind": "Status", "code": 409,
                               "message": f"uid mismatch: the provided object specified uid {uid}, and no existing "
                               "object was found"}))
        if live["metadata"].get("uid") != uid:
            raise ApiException(status=422, reason="Unprocessable Entity", body=json.dumps({
                "kind": "Status", "code": 422, "message": f"{plural} {name!r} is invalid: metadata.uid: Invalid "
                f"value: {uid!r}: field is immutable"}))
        self.objects[key] = {**copy.deepcopy(body), "status": live.get("status", {})}
        self.writes.append(f"apply {plural}/{name}")
        return copy.deepcopy(self.objects[key])

    def _rejection(self, plural: str) -> ApiException:
        return ApiException(status=422, reason="Unprocessable Entity", body=json.dumps(
            {"kind": "Status", "message": self.reject[plural], "reason": "Invalid", "code": 422}))

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


def state_for(api: InMemoryApi, **settings: Any) -> State:
    return State(OperatorConfig(discovery_ttl_seconds=0, **settings), api)


def written(api: InMemoryApi, plural: str) -> list[str]:
    return [w for w in api.writes if w.startswith((f"create {plural}/", f"apply {plural}/", f"own {plural}/"))]


def conditions(api: InMemoryApi) -> dict[str, tuple[str, str]]:
    status = api.objects[("slmdeployments", "ns", "m")]["status"]
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def run(api: InMemoryApi, state: State, cr: dict[str, Any]) -> None:
    api.add(cr)
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="test")


def test_second_pass_writes_nothing(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd())
    first = list(api.writes)
    assert "create deployments/m" in first and "create prometheusrules/m" in first and "status m" in first
    api.writes.clear()
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="resync")
    assert api.writes == []


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


def test_crds_that_exist_but_are_not_served_yet_are_a_retry_not_missing_crds(api: InMemoryApi) -> None:
    """Right after an API server restart, discovery leaves out CRDs whose informer has not synced yet
    (found by tests/e2e/test_platform_faults.py): reporting them missing would skip the monitors until the
    next resync. Their CRD objects exist, so the writes are retried (kopf retries a 404) until served."""
    api.monitoring_crds = False  # discovery and every monitoring path answer 404, as in that window
    for crd in ("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com",
                "alertmanagerconfigs.monitoring.coreos.com"):
        api.objects[("customresourcedefinitions", None, crd)] = {"metadata": {"name": crd}}
    state = state_for(api)
    with pytest.raises(ApiException) as caught:
        run(api, state, slmd())
    assert caught.value.status == 404
    assert "PrometheusOperatorCRDsMissing" not in json.dumps(api.objects[("slmdeployments", "ns", "m")])
    api.monitoring_crds = True  # served now
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="create")
    assert ("servicemonitors", "ns", "m") in api.objects and ("prometheusrules", "ns", "m") in api.objects
    assert conditions(api)["MonitoringReady"] == ("True", "MonitorsApplied")


def test_crds_being_deleted_count_as_missing(api: InMemoryApi) -> None:
    api.monitoring_crds = False
    for crd in ("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com",
                "alertmanagerconfigs.monitoring.coreos.com"):
        api.objects[("customresourcedefinitions", None, crd)] = {
            "metadata": {"name": crd, "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    state = state_for(api)
    run(api, state, slmd())
    assert conditions(api)["MonitoringReady"] == ("False", "PrometheusOperatorCRDsMissing")


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


def test_gpu_request_no_node_can_meet_is_failed_not_raised(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd(resources={"gpus": 8}))
    assert conditions(api)["Ready"] == ("False", "InsufficientGPU")
    assert api.objects[("slmdeployments", "ns", "m")]["status"]["phase"] == "Failed"
    assert "create events" in api.writes  # a Warning Event says why


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


def test_a_child_event_that_meets_an_api_outage_is_retried_later(api: InMemoryApi) -> None:
    """kopf does not retry event handlers: a child deleted (or a rollout finished) while the API server
    restarts would wait for the next resync (found by tests/e2e/test_platform_faults.py)."""
    state = state_for(api)
    run(api, state, slmd())
    rule = api.objects.pop(("prometheusrules", "ns", "m"))
    api.down = True
    lifecycle.child_event(state, "DELETED", rule)  # no exception: the work is queued
    lifecycle.child_event(state, "DELETED", rule)
    assert state.sizes()["retries"] == 1  # one pending retry per SLMDeployment, not one per event
    assert ("prometheusrules", "ns", "m") not in api.objects
    api.down = False
    deadline = time.monotonic() + 30
    while ("prometheusrules", "ns", "m") not in api.objects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ("prometheusrules", "ns", "m") in api.objects
    assert state.sizes()["retries"] == 0


def test_a_pending_retry_is_dropped_with_its_slmdeployment(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd())
    rule = api.objects.pop(("prometheusrules", "ns", "m"))
    api.down = True
    lifecycle.child_event(state, "DELETED", rule)
    assert state.sizes()["retries"] == 1
    lifecycle.on_slmdeployment_event(state, "DELETED", api.objects[("slmdeployments", "ns", "m")])
    assert state.sizes()["retries"] == 0


def test_someone_elses_object_of_the_same_name_is_left_alone_and_reported(api: InMemoryApi) -> None:
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m", "namespace": "ns"},
              "spec": {"ports": [{"port": 80}]}}
    api.add(copy.deepcopy(theirs))
    state = state_for(api)
    run(api, state, slmd())
    assert api.objects[("services", "ns", "m")] == theirs
    assert not written(api, "services")
    assert conditions(api)["Ready"] == ("False", "NameConflict")
    assert api.objects[("slmdeployments", "ns", "m")]["status"]["phase"] == "Failed"


def test_an_update_never_takes_over_someone_elses_service(api: InMemoryApi) -> None:
    """Issue 23.1: on an update trigger the cache (fed by label-filtered watches) never holds a foreign
    object; a cache miss must still read before writing."""
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m", "namespace": "ns", "uid": "theirs"},
              "spec": {"ports": [{"port": 80}], "selector": {"app": "theirs"}}}
    api.add(copy.deepcopy(theirs))
    state = state_for(api)
    run(api, state, slmd())
    api.objects[("slmdeployments", "ns", "m")]["spec"]["replicas"] = 2
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="update")
    assert api.objects[("services", "ns", "m")] == theirs
    assert not written(api, "services")
    assert conditions(api)["Ready"] == ("False", "NameConflict")


def test_switching_dashboards_on_never_takes_over_a_foreign_config_map(api: InMemoryApi) -> None:
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m-dashboard", "namespace": "ns",
                                                                    "uid": "theirs"}, "data": {"a": "b"}}
    api.add(copy.deepcopy(theirs))
    state = state_for(api)
    run(api, state, slmd(monitoring={"dashboards": {"enabled": False}}))
    assert conditions(api)["MonitoringReady"] == ("True", "MonitorsApplied")
    api.objects[("slmdeployments", "ns", "m")]["spec"]["monitoring"]["dashboards"]["enabled"] = True
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="update")
    assert api.objects[("configmaps", "ns", "m-dashboard")] == theirs
    status, reason = conditions(api)["MonitoringReady"]
    assert (status, reason) == ("False", "NameConflict")
    message = next(c["message"] for c in api.objects[("slmdeployments", "ns", "m")]["status"]["conditions"]
                   if c["type"] == "MonitoringReady")
    assert "ConfigMap ns/m-dashboard" in message


def test_our_labels_on_someone_elses_object_do_not_make_it_ours(api: InMemoryApi) -> None:
    """The managed-by label is not ownership: only an ownerReference to this SLMDeployment's uid is."""
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "m", "namespace": "ns", "uid": "theirs",
        "labels": {"app.kubernetes.io/managed-by": "slm-operator", "slm.dev/deployment": "m"}},
        "spec": {"ports": [{"port": 80}]}}
    api.add(copy.deepcopy(theirs))
    state = state_for(api)
    state.children.put(theirs)  # the label-filtered watch sees it
    run(api, state, slmd())
    assert api.objects[("services", "ns", "m")] == theirs
    assert conditions(api)["Ready"] == ("False", "NameConflict")


def test_an_object_created_between_the_read_and_the_write_is_not_taken_over(api: InMemoryApi) -> None:
    """The apply carries the uid it was decided on (a create-only uid when the object was absent): the
    API server refuses it if someone else's object appeared meanwhile."""
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m", "namespace": "ns", "uid": "theirs"},
              "spec": {"ports": [{"port": 80}]}}

    def race(plural: str, name: str) -> None:
        if plural == "services" and ("services", "ns", "m") not in api.objects:
            api.add(copy.deepcopy(theirs))

    api.before_apply.append(race)
    state = state_for(api)
    run(api, state, slmd())
    assert api.objects[("services", "ns", "m")] == theirs
    assert conditions(api)["Ready"] == ("False", "NameConflict")


def test_a_child_the_api_server_refuses_is_invalid_spec_not_a_retry_loop(api: InMemoryApi) -> None:
    api.reject["deployments"] = ('Deployment.apps "m" is invalid: spec.template.spec.containers[0].resources.'
                                 'requests[cpu]: Invalid value: "abc": must be a quantity')
    state = state_for(api)
    run(api, state, slmd())  # returns: no exception for kopf to retry
    assert conditions(api)["Ready"] == ("False", "InvalidSpec")
    status = api.objects[("slmdeployments", "ns", "m")]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert 'requests[cpu]: Invalid value: "abc"' in ready["message"] and "Deployment ns/m" in ready["message"]
    assert status["phase"] == "Failed"
    assert ("services", "ns", "m") in api.objects  # the other children are applied all the same


def test_a_spec_the_operator_cannot_read_is_invalid_spec(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd(server={"maxNewTokens": "many"}))
    assert conditions(api)["Ready"] == ("False", "InvalidSpec")
    assert {w for w in api.writes if w.startswith(("create ", "apply "))} == {"create events"}  # Warnings only


def test_per_resource_state_is_dropped_when_the_slmdeployment_is_deleted(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd())
    assert state.sizes()["rendered"] == 1 and state.sizes()["locks"] == 1 and state.sizes()["parents"] == 1
    assert state.sizes()["alerts_said"] == 1  # the built-in server has no KV-cache or preemption series
    body = api.objects.pop(("slmdeployments", "ns", "m"))
    lifecycle.on_slmdeployment_event(state, "DELETED", body)
    sizes = state.sizes()
    assert (sizes["rendered"], sizes["alerts_said"], sizes["locks"], sizes["parents"]) == (0, 0, 0, 0)


def test_a_resync_drops_state_of_deletions_it_did_not_see(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd())
    del api.objects[("slmdeployments", "ns", "m")]  # deleted while the watch was down
    lifecycle.resync_once(state)
    sizes = state.sizes()
    assert (sizes["rendered"], sizes["alerts_said"], sizes["locks"], sizes["parents"]) == (0, 0, 0, 0)


def test_secret_references_are_checked_by_metadata_only(api: InMemoryApi) -> None:
    state = state_for(api)
    api.add({"kind": "Secret", "metadata": {"name": "hook", "namespace": "ns"}, "data": {"url": "c2VjcmV0"}})
    run(api, state, slmd(monitoring={"notifications": {"webhook": {"urlSecretRef": {"name": "hook", "key": "url"}}}}))
    assert api.secret_reads and all("as=PartialObjectMetadata" in accept for accept in api.secret_reads)
    assert conditions(api)["MonitoringReady"] == ("True", "MonitorsApplied")


def test_fault_injection_asked_but_not_allowed_is_a_condition_and_a_warning_event(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd(server={"faultsAdmin": True}, logging={"outputs": "full"}))
    assert conditions(api)["SettingsApplied"] == ("False", "FaultInjectionNotAllowed")
    message = next(c["message"] for c in api.objects[("slmdeployments", "ns", "m")]["status"]["conditions"]
                   if c["type"] == "SettingsApplied")
    assert "spec.server.faultsAdmin" in message and "spec.logging.outputs" in message
    env = {e["name"]: e.get("value") for e in api.objects[("deployments", "ns", "m")]["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert "SLM_FAULTS_ADMIN" not in env and env["SLM_LOG_OUTPUTS"] == "hash"
    assert "create events" in api.writes
    allowed = state_for(api, allow_fault_injection=True, allow_full_output_logging=True)
    reconcile(allowed, api.objects[("slmdeployments", "ns", "m")], trigger="resync")
    assert conditions(api)["SettingsApplied"] == ("True", "AsRequested")


def test_a_missing_secret_the_pods_need_is_reported(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd(logging={"outputHashKeySecretRef": {"name": "hash-key", "key": "k"}}))
    assert conditions(api)["Ready"] == ("False", "SecretNotFound")
    api.add({"kind": "Secret", "metadata": {"name": "hash-key", "namespace": "ns"}})
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="resync")
    assert conditions(api)["Ready"][1] != "SecretNotFound"


def test_a_flag_the_operator_owns_in_runtime_args_is_invalid_spec_without_a_retry_loop(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd(runtime="vllm", runtimeArgs=["--max-num-seqs", "8", "--port", "9000"]))  # no exception
    assert conditions(api)["Ready"] == ("False", "InvalidSpec")
    ready = next(c for c in api.objects[("slmdeployments", "ns", "m")]["status"]["conditions"] if c["type"] == "Ready")
    assert "runtimeArgs may not set --port" in ready["message"]
    assert ("deployments", "ns", "m") not in api.objects  # nothing rendered from a spec it refused
    api.writes.clear()
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="resync")
    assert api.writes == []  # the same verdict: no status write, no Event, nothing to retry


def test_alerts_the_runtime_cannot_fire_are_a_condition_and_one_event(api: InMemoryApi) -> None:
    state = state_for(api)
    run(api, state, slmd(runtime="tgi"))
    assert conditions(api)["AlertsUnsupported"] == ("True", "RuntimeLacksSignals")
    said = [e for e in api.events if e["reason"] == "RuntimeLacksSignals"]
    assert len(said) == 1 and said[0]["type"] == "Normal"
    assert "SLMKVCacheSaturated: no KV-cache gauge" in said[0]["message"]
    assert conditions(api)["Ready"][1] != "InvalidSpec"
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="resync")
    assert len([e for e in api.events if e["reason"] == "RuntimeLacksSignals"]) == 1  # not once per resync
    # Nor when a second trigger starts from the same stale copy of the object (no status yet in it).
    stale = copy.deepcopy(api.objects[("slmdeployments", "ns", "m")])
    stale.pop("status")
    reconcile(state, stale, trigger="resync")
    assert len([e for e in api.events if e["reason"] == "RuntimeLacksSignals"]) == 1
    # Acknowledged in alerts.disabled: the condition clears.
    api.objects[("slmdeployments", "ns", "m")]["spec"]["monitoring"] = {"alerts": {"disabled": [
        "SLMHighTimeToFirstToken", "SLMQueueSaturated", "SLMGPUMetricsAbsent", "SLMLowDiskSpace",
        "SLMFaultInjectionEnabled", "SLMKVCacheSaturated", "SLMRequestsPreempted", "SLMPerplexityDrift"]}}
    reconcile(state, api.objects[("slmdeployments", "ns", "m")], trigger="resync")
    assert conditions(api)["AlertsUnsupported"] == ("False", "AllAlertsRendered")
