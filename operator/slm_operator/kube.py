"""The one place that talks to the API server: apply (server-side, skipping unchanged objects), get, delete.

Synchronous (the official `kubernetes` client); kopf runs the handlers that call it in its thread pool.
Every write is counted in slm_operator.metrics so a no-op resync is provably write-free.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from slm_operator import GROUP, PLURAL, VERSION, metrics

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ApiResource:
    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [prefix]
        if self.namespaced and namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


RESOURCES: dict[str, ApiResource] = {
    "Deployment": ApiResource("apps/v1", "deployments"),
    "Service": ApiResource("v1", "services"),
    "ConfigMap": ApiResource("v1", "configmaps"),
    "Secret": ApiResource("v1", "secrets"),
    "Event": ApiResource("v1", "events"),
    "Node": ApiResource("v1", "nodes", namespaced=False),
    "PodDisruptionBudget": ApiResource("policy/v1", "poddisruptionbudgets"),
    "ServiceMonitor": ApiResource("monitoring.coreos.com/v1", "servicemonitors"),
    "PrometheusRule": ApiResource("monitoring.coreos.com/v1", "prometheusrules"),
    "Prometheus": ApiResource("monitoring.coreos.com/v1", "prometheuses"),
    "AlertmanagerConfig": ApiResource("monitoring.coreos.com/v1alpha1", "alertmanagerconfigs"),
    "SLMDeployment": ApiResource(f"{GROUP}/{VERSION}", PLURAL),
}
# Kinds that exist only once the Prometheus Operator CRDs are installed.
MONITORING_KINDS = ("ServiceMonitor", "PrometheusRule", "AlertmanagerConfig")


def load_config() -> client.ApiClient:
    """An ApiClient from the in-cluster service account, else $KUBECONFIG / ~/.kube/config."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # One pool connection per reconcile worker plus the status and event writers.
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


# --- comparing desired with live ------------------------------------------------------------------

def _quantity_equal(desired: Any, live: Any) -> bool:
    try:
        return bool(parse_quantity(desired) == parse_quantity(live))
    except (ValueError, TypeError, ArithmeticError):
        return False


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == [] or value == ""


def is_subset(desired: Any, live: Any) -> bool:
    """True when every field the operator sets has the same value in the live object.

    Fields the API server adds (defaults, status, managedFields) are ignored; quantities compare by
    value ("1000m" == "1"), ints compare with their string form (int-or-string), and an empty map or
    list the server omits counts as equal.
    """
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return _empty(desired) and _empty(live)
        for key, value in desired.items():
            if key not in live:
                if _empty(value):
                    continue
                return False
            if not is_subset(value, live[key]):
                return False
        return True
    if isinstance(desired, list):
        if not isinstance(live, list):
            return _empty(desired) and _empty(live)
        return len(desired) == len(live) and all(is_subset(d, v) for d, v in zip(desired, live, strict=True))
    if desired == live:
        return True
    if isinstance(desired, bool) or isinstance(live, bool):
        return False
    if isinstance(desired, int | float | str) and isinstance(live, int | float | str):
        if str(desired) == str(live):
            return True
        return _quantity_equal(desired, live)
    return False


APPLIED_HASH = "slm.dev/applied-hash"


def with_applied_hash(desired: Mapping[str, Any]) -> dict[str, Any]:
    """`desired` plus an annotation hashing it.

    The subset test alone cannot see a field the operator stopped setting (a removed nodeSelector
    would linger); a changed hash makes the apply happen, and server-side apply then drops the fields
    this field manager no longer sets.
    """
    canonical = json.dumps(desired, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    obj = copy.deepcopy(dict(desired))
    annotations = {**obj["metadata"].get("annotations", {}), APPLIED_HASH: digest}
    obj["metadata"] = {**obj["metadata"], "annotations": annotations}
    return obj


# --- the client -----------------------------------------------------------------------------------

class Kube:
    """Thin synchronous API wrapper; `apply` is the only way children are written."""

    def __init__(self, api_client: client.ApiClient, *, field_manager: str = "slm-operator") -> None:
        self.api_client = api_client
        self.field_manager = field_manager
        self.core = client.CoreV1Api(api_client)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, header_params, serialized_body, _ = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(method, url, header_params=header_params, body=serialized_body,
                                            _request_timeout=timeout)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=response.reason, body=data.decode(errors="replace"))
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The live object, or None when it (or its whole API) does not exist."""
        try:
            return self.request("GET", RESOURCES[kind].path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self, kind: str, namespace: str | None = None, *, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        try:
            items = self.request("GET", RESOURCES[kind].path(namespace), query=query).get("items", [])
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise
        resource = RESOURCES[kind]
        # List items carry no kind/apiVersion; callers key objects by kind.
        return [{"apiVersion": resource.api_version, "kind": kind, **item} for item in items]

    def apply(self, desired: dict[str, Any], *, live: dict[str, Any] | None = None, fetch: bool = True) -> str:
        """Make the object match `desired`; returns "unchanged", "created" or "updated"."""
        return self.apply_object(desired, live=live, fetch=fetch)[0]

    def apply_object(
        self, desired: dict[str, Any], *, live: dict[str, Any] | None = None, fetch: bool = True
    ) -> tuple[str, dict[str, Any] | None]:
        """Like `apply`, also returning the object as the API server now has it (None if unknown).

        Reads the live object (unless given), skips the write when every desired field already holds,
        else server-side applies with force: the operator owns these fields, a hand edit is reverted.
        """
        desired = with_applied_hash(desired)
        kind = desired["kind"]
        namespace = desired["metadata"].get("namespace")
        name = desired["metadata"]["name"]
        if live is None and fetch:
            live = self.get(kind, namespace, name)
        if live is not None and is_subset(desired, live):
            metrics.APPLY_SKIPPED.labels(kind=kind).inc()
            return "unchanged", live
        written = self.request(
            "PATCH",
            RESOURCES[kind].path(namespace, name),
            query=[("fieldManager", self.field_manager), ("force", "true")],
            body=desired,
            content_type="application/apply-patch+yaml",  # JSON is YAML; the client sends it as JSON
        )
        verb = "created" if live is None else "updated"
        metrics.API_WRITES.labels(kind=kind, verb="apply").inc()
        return verb, (written or None)

    def delete(self, kind: str, namespace: str | None, name: str, *, uid: str | None = None) -> bool:
        """Delete (background propagation); False when already gone. `uid` guards against a namesake."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", RESOURCES[kind].path(namespace, name), body=body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        metrics.API_WRITES.labels(kind=kind, verb="delete").inc()
        return True

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge-patch the SLMDeployment's status subresource."""
        self.request(
            "PATCH",
            RESOURCES["SLMDeployment"].path(namespace, name, "status"),
            body={"status": dict(status)},
            content_type="application/merge-patch+json",
        )
        metrics.API_WRITES.labels(kind="SLMDeployment", verb="patch_status").inc()

    def post_event(self, parent: Mapping[str, Any], *, reason: str, message: str, warning: bool = False) -> None:
        """A core/v1 Event on the SLMDeployment; failures are logged, never raised (events are best effort)."""
        meta = parent["metadata"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": parent.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": parent.get("kind", "SLMDeployment"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": self.field_manager},
            "reportingComponent": self.field_manager,
            "reportingInstance": self.field_manager,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", RESOURCES["Event"].path(meta["namespace"]), body=event)
            metrics.API_WRITES.labels(kind="Event", verb="create").inc()
        except ApiException as exc:
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc.status)

    def served_kinds(self, kinds: tuple[str, ...] = MONITORING_KINDS) -> set[str]:
        """Which of `kinds` the API server serves now (API discovery per group-version)."""
        served: set[str] = set()
        by_version: dict[str, list[str]] = {}
        for kind in kinds:
            by_version.setdefault(RESOURCES[kind].api_version, []).append(kind)
        for api_version, members in by_version.items():
            try:
                found = self.request("GET", f"/apis/{api_version}")
            except ApiException as exc:
                if exc.status in (404, 503):
                    continue
                raise
            plurals = {r.get("name") for r in found.get("resources", [])}
            served.update(k for k in members if RESOURCES[k].plural in plurals)
        return served


class TTLCache:
    """A value recomputed at most every `ttl` seconds (discovery, nodes, Prometheus selectors)."""

    def __init__(self, ttl: float, compute: Callable[[], Any]) -> None:
        self.ttl = ttl
        self._compute = compute
        self._lock = threading.Lock()
        self._value: Any = None
        self._at = float("-inf")

    def get(self) -> Any:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                self._value = self._compute()
                self._at = time.monotonic()
            return self._value

    def invalidate(self) -> None:
        with self._lock:
            self._at = float("-inf")
