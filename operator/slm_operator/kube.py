"""The one place that talks to the API server: create, apply (server-side, skipping unchanged objects), get, delete.

Synchronous (the official `kubernetes` client); kopf runs the handlers that call it in its thread pool.
Every request goes through `Kube.request` (retries, the record of verbs used); every write is counted
in slm_operator.metrics so a no-op resync is provably write-free.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import email.utils
import hashlib
import json
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import urllib3
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
    "NetworkPolicy": ApiResource("networking.k8s.io/v1", "networkpolicies"),
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
    return client.ApiClient(tuned(configuration))


def tuned(configuration: client.Configuration) -> client.Configuration:
    """The client settings Kube relies on."""
    # One pool connection per reconcile worker plus the status and event writers.
    configuration.connection_pool_maxsize = 32
    # urllib3 would otherwise retry some requests itself (GETs on 429/503, sleeping in Retry-After) and not
    # others (no PATCH): Kube.request is the one place that retries, the same way for every request.
    configuration.retries = 0
    return configuration


# --- comparing desired with live ------------------------------------------------------------------

def _quantity_equal(desired: Any, live: Any) -> bool:
    try:
        return bool(parse_quantity(desired) == parse_quantity(live))
    except (ValueError, TypeError, ArithmeticError):
        return False


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == [] or value == ""


# Lists the API server merges item by item under server-side apply (listType=map in the Kubernetes API),
# by these key fields. Items another field manager adds to them stay after our apply, so they are not
# drift. Every other list is atomic: our apply replaces it whole, and the live list must equal ours.
ASSOCIATIVE_LISTS: dict[str, tuple[str, ...]] = {
    "metadata.ownerReferences": ("uid",),
    "spec.ports": ("port", "protocol"),  # Service
    "spec.template.spec.containers": ("name",),
    "spec.template.spec.initContainers": ("name",),
    "spec.template.spec.volumes": ("name",),
    "spec.template.spec.imagePullSecrets": ("name",),
    "spec.template.spec.containers[].env": ("name",),
    "spec.template.spec.containers[].ports": ("containerPort", "protocol"),
    "spec.template.spec.containers[].volumeMounts": ("mountPath",),
}
_KEY_DEFAULTS = {"protocol": "TCP"}


def _item_key(item: Any, fields: tuple[str, ...]) -> tuple[Any, ...] | None:
    if not isinstance(item, Mapping):
        return None
    return tuple(str(item.get(f, _KEY_DEFAULTS.get(f))) for f in fields)


def is_subset(desired: Any, live: Any, path: str = "") -> bool:
    """True when every field the operator sets has the same value in the live object.

    Fields the API server or other field managers add (defaults, status, managedFields, items of an
    associative list) are ignored; quantities compare by value ("1000m" == "1"), ints compare with
    their string form (int-or-string), and an empty map or list the server omits counts as equal.
    """
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return _empty(desired) and _empty(live)
        for key, value in desired.items():
            if key not in live:
                if _empty(value):
                    continue
                return False
            if not is_subset(value, live[key], f"{path}.{key}" if path else str(key)):
                return False
        return True
    if isinstance(desired, list):
        if not isinstance(live, list):
            return _empty(desired) and _empty(live)
        key_fields = ASSOCIATIVE_LISTS.get(path)
        if key_fields is not None:
            by_key = {_item_key(item, key_fields): item for item in live}
            return all(
                _item_key(item, key_fields) in by_key
                and is_subset(item, by_key[_item_key(item, key_fields)], f"{path}[]")
                for item in desired
            )
        return len(desired) == len(live) and all(
            is_subset(d, v, f"{path}[]") for d, v in zip(desired, live, strict=True))
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


# --- retries --------------------------------------------------------------------------------------

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


class OwnershipChanged(Exception):
    """The object is not the one the apply was decided on (created or replaced by someone else meanwhile)."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How `Kube.request` retries: 429 after the server's Retry-After, 5xx and lost connections with
    exponential backoff and full jitter (AWS architecture blog, "Exponential Backoff And Jitter")."""

    attempts: int = 5  # tries in all
    base_seconds: float = 0.5
    cap_seconds: float = 10.0
    retry_after_cap_seconds: float = 60.0  # a Retry-After longer than this is clipped

    def delay(self, retry: int, retry_after: str | None, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        if retry_after is not None:
            seconds = _retry_after_seconds(retry_after)
            if seconds is not None:
                return min(seconds, self.retry_after_cap_seconds)
        return rng.uniform(0, min(self.cap_seconds, self.base_seconds * 2 ** retry))


def _retry_after_seconds(value: str) -> float | None:
    """Retry-After as delta-seconds or an HTTP date (RFC 9110 10.2.3); None when it is neither."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


# --- what the operator asks of the API server, in RBAC terms --------------------------------------

def rbac_of(method: str, path: str) -> tuple[str, str, str] | None:
    """(API group, resource[/subresource], verb) that a request needs; None for discovery (open to all)."""
    parts = urllib.parse.urlparse(path).path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    if not rest:
        return None
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
    verb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch", "PUT": "update",
            "DELETE": "delete"}[method]
    return group, f"{resource}/{sub}" if sub else resource, verb


# --- the client -----------------------------------------------------------------------------------

class Kube:
    """Thin synchronous API wrapper; `apply_object` is the only way children are written."""

    def __init__(self, api_client: client.ApiClient, *, field_manager: str = "slm-operator",
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.api_client = api_client
        self.field_manager = field_manager
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self._rng = random.Random()
        # (group, resource, verb) of every request made: tests compare it with the chart's RBAC.
        self.verbs_used: set[tuple[str, str, str]] = set()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """One API call, retried on 429 (after Retry-After), 5xx and lost connections (with backoff)."""
        needed = rbac_of(method, path)
        if needed is not None:
            self.verbs_used.add(needed)
        for retry in range(self.retry.attempts):
            last = retry == self.retry.attempts - 1
            try:
                return self._send(method, path, query=query or [], body=body, content_type=content_type,
                                  accept=accept, timeout=timeout)
            except ApiException as exc:
                if exc.status not in RETRIED_STATUSES or last:
                    raise
                headers = exc.headers or {}
                retry_after = headers.get("Retry-After") if exc.status == 429 else None
                delay = self.retry.delay(retry, retry_after, self._rng)
                log.info("%s %s answered %s; retrying in %.2fs", method, path, exc.status, delay)
            except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out: the API server restarting
                if last:
                    raise ApiException(status=0, reason=f"{type(exc).__name__}: {exc}") from exc
                delay = self.retry.delay(retry, None, self._rng)
                log.info("%s %s failed (%s); retrying in %.2fs", method, path, type(exc).__name__, delay)
            self.sleep(delay)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _send(self, method: str, path: str, *, query: list[tuple[str, str]], body: Any, content_type: str,
              accept: str, timeout: float) -> dict[str, Any]:
        """The HTTP exchange itself; raises ApiException (with the response headers) on a non-2xx answer."""
        headers = {"Accept": accept, "Content-Type": content_type}
        _, url, header_params, serialized_body, _ = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(method, url, header_params=header_params, body=serialized_body,
                                            _request_timeout=timeout)
        data = response.read()
        if not 200 <= response.status <= 299:
            error = ApiException(status=response.status, reason=response.reason, body=data.decode(errors="replace"))
            error.headers = response.headers
            raise error
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The live object, or None when it (or its whole API) does not exist."""
        try:
            return self.request("GET", RESOURCES[kind].path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_metadata(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """Only the object's metadata (PartialObjectMetadata), or None when it does not exist.

        Used for Secrets: the operator checks that a referenced Secret exists without ever receiving
        its values.
        """
        try:
            return self.request("GET", RESOURCES[kind].path(namespace, name),
                                accept="application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1")
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

    def apply_object(self, desired: dict[str, Any], *, live: dict[str, Any] | None,
                     ) -> tuple[str, dict[str, Any] | None]:
        """Make the object match `desired`: "unchanged", "created" or "updated", and the object as written.

        `live` is the object as last read, and the caller has checked that it is this operator's to write
        (None: it does not exist). Neither write can land on an object that changed hands since it was
        read: a create is a POST (refused when the name is taken), an update a server-side apply that
        carries `live`'s uid (refused when the object was replaced). OwnershipChanged says so.
        """
        desired = with_applied_hash(desired)
        kind = desired["kind"]
        namespace = desired["metadata"].get("namespace")
        name = desired["metadata"]["name"]
        if live is None:
            return "created", self._create(desired)
        if is_subset(desired, live):
            metrics.APPLY_SKIPPED.labels(kind=kind).inc()
            return "unchanged", live
        body = {**desired, "metadata": {**desired["metadata"], "uid": live["metadata"]["uid"]}}
        try:
            # With force: the operator owns these fields, a hand edit is reverted.
            written = self.request(
                "PATCH",
                RESOURCES[kind].path(namespace, name),
                query=[("fieldManager", self.field_manager), ("force", "true")],
                body=body,
                content_type="application/apply-patch+yaml",  # JSON is YAML; the client sends it as JSON
            )
        except ApiException as exc:
            # 422 "metadata.uid ... field is immutable": replaced; 409 "uid mismatch": deleted meanwhile.
            if exc.status in (409, 422) and ("metadata.uid" in str(exc.body) or "uid mismatch" in str(exc.body)):
                raise OwnershipChanged(f"{kind} {namespace}/{name} changed since it was read") from exc
            raise
        metrics.API_WRITES.labels(kind=kind, verb="apply").inc()
        return "updated", (written or None)

    def _create(self, desired: dict[str, Any]) -> dict[str, Any] | None:
        """POST, so that a name someone else took meanwhile is refused (409), never taken over.

        A create records its fields under an "Update" entry of our field manager, which a later apply
        would not clear: a field the operator stops setting would linger. The entry is turned into our
        "Apply" entry right away (the object's resourceVersion guards that write).
        """
        kind, namespace, name = desired["kind"], desired["metadata"].get("namespace"), desired["metadata"]["name"]
        try:
            created = self.request("POST", RESOURCES[kind].path(namespace),
                                   query=[("fieldManager", self.field_manager)], body=desired)
        except ApiException as exc:
            if exc.status == 409:
                raise OwnershipChanged(f"{kind} {namespace}/{name} was created by someone else meanwhile") from exc
            raise
        metrics.API_WRITES.labels(kind=kind, verb="create").inc()
        meta = created.get("metadata") or {}
        fields = [{**entry, "operation": "Apply"} if entry.get("manager") == self.field_manager else entry
                  for entry in meta.get("managedFields") or []]
        if not fields:
            return created
        try:
            owned = self.request(
                "PATCH", RESOURCES[kind].path(namespace, name), content_type="application/merge-patch+json",
                body={"metadata": {"managedFields": fields, "resourceVersion": meta["resourceVersion"]}})
        except ApiException as exc:  # changed meanwhile: the next apply converges; a dropped field may linger
            log.warning("could not record %s %s/%s as applied: %s", kind, namespace, name, exc.status)
            return created
        metrics.API_WRITES.labels(kind=kind, verb="own_fields").inc()
        return owned

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
        # Discovery lags the CRDs themselves: right after an API server (re)start it serves a CRD's API only
        # once its CRD informer has synced. A kind whose CRD exists (and is not being deleted) is counted as
        # served, so a reconcile in that window retries its writes (404 is transient) instead of reporting
        # the CRDs missing and skipping the monitors until the next resync.
        for kind in kinds:
            if kind not in served and self._crd_exists(kind):
                served.add(kind)
        return served

    def _crd_exists(self, kind: str) -> bool:
        """Whether the CRD of `kind` exists and is not being deleted (metadata only; `list`, which kopf
        needs on CRDs anyway; False when CRDs may not be read)."""
        resource = RESOURCES[kind]
        name = f"{resource.plural}.{resource.api_version.split('/')[0]}"
        try:
            found = self.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                                 query=[("fieldSelector", f"metadata.name={name}")],
                                 accept="application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")
        except ApiException as exc:
            if exc.status in (403, 404):
                return False
            raise
        return any((item.get("metadata") or {}).get("name") == name
                   and not (item.get("metadata") or {}).get("deletionTimestamp")
                   for item in found.get("items") or [])  # an empty metadata list has "items": null


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
