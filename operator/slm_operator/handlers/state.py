"""What the operator keeps in memory between handler calls (lives in kopf's `memo`)."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from slm_operator.config import OperatorConfig
from slm_operator.kube import MONITORING_KINDS, Kube, TTLCache
from slm_operator.spec import lookup

ChildKey = tuple[str, str, str]  # kind, namespace, name


@dataclasses.dataclass(frozen=True)
class PrometheusSelectors:
    """What the Prometheus resources select ServiceMonitors and PrometheusRules by."""

    prometheuses: tuple[str, ...]  # namespace/name of each Prometheus resource
    service_monitor: tuple[Mapping[str, Any] | None, ...]  # spec.serviceMonitorSelector of each
    rule: tuple[Mapping[str, Any] | None, ...]  # spec.ruleSelector of each


def _without_managed_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """managedFields mirror every field path and can outweigh the object; the operator never reads them."""
    slim = dict(obj)
    meta = slim.get("metadata")
    if isinstance(meta, Mapping) and "managedFields" in meta:
        slim["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return slim


def _compact(obj: Mapping[str, Any]) -> str:
    return json.dumps(_without_managed_fields(obj), separators=(",", ":"))


class ChildCache:
    """The last seen version of every child, fed by the label-filtered child watches.

    Lets a resync compare desired with live without reading from the API server; an object not in
    the cache is read (the watch of its kind may not run yet, e.g. right after its CRD appeared).
    Objects are kept as compact JSON text: a parsed PrometheusRule or dashboard weighs several times
    its text, and 200 SLMDeployments own 1,200 of them (the operator's RSS goal is 256 MiB).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[ChildKey, str] = {}

    @staticmethod
    def key(obj: Mapping[str, Any]) -> ChildKey:
        return obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]

    def put(self, obj: Mapping[str, Any]) -> None:
        text = _compact(obj)
        with self._lock:
            self._objects[self.key(obj)] = text

    def forget(self, key: ChildKey) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def get(self, key: ChildKey) -> dict[str, Any] | None:
        with self._lock:
            text = self._objects.get(key)
        return None if text is None else dict(json.loads(text))

    def replace_kind(self, kind: str, objects: list[dict[str, Any]], namespaces: tuple[str, ...] = ()) -> None:
        """Everything cached of `kind` (in `namespaces`, or all) becomes exactly `objects`."""
        with self._lock:
            for key in [k for k in self._objects if k[0] == kind and (not namespaces or k[1] in namespaces)]:
                del self._objects[key]
            for obj in objects:
                self._objects[self.key(obj)] = _compact(obj)

    def forget_kind(self, kind: str) -> None:
        with self._lock:
            for key in [k for k in self._objects if k[0] == kind]:
                del self._objects[key]

    def count_by_kind(self) -> dict[str, int]:
        with self._lock:
            return dict(collections.Counter(kind for kind, _, _ in self._objects))


ParentKey = tuple[str, str]  # namespace, name


class State:
    """Shared by all handlers (it lives in kopf's memo): the API client, caches, and per SLMDeployment a
    lock and its last render. The per-SLMDeployment entries are dropped when it is deleted (`forget`),
    so memory follows the number of SLMDeployments that exist, not of those that ever existed."""

    def __init__(self, cfg: OperatorConfig, kube: Kube) -> None:
        self.cfg = cfg
        self.kube = kube
        self.namespaces = cfg.namespaces  # empty: all namespaces
        self.children = ChildCache()
        self.served_kinds = TTLCache(cfg.discovery_ttl_seconds, lambda: frozenset(kube.served_kinds(MONITORING_KINDS)))
        self.gpu_nodes = TTLCache(cfg.discovery_ttl_seconds, self._gpu_nodes)
        self.prometheus_selectors = TTLCache(cfg.discovery_ttl_seconds, self._prometheus_selectors)
        self._locks: dict[ParentKey, threading.Lock] = collections.defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        # Per SLMDeployment (namespace, name): (hash of the render inputs, rendered children and problems as JSON).
        self.rendered: dict[ParentKey, tuple[str, str]] = {}
        # Per SLMDeployment: (uid, message) of the AlertsUnsupported Event last posted
        # (reconcile._say_unsupported_alerts).
        self.alerts_said: dict[ParentKey, tuple[str, str]] = {}
        self.parents: set[ParentKey] = set()
        # Applies of one reconcile run concurrently; shared by all reconciles, so bounded overall.
        self.apply_pool = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="apply")
        # A reconcile to run again later (a child event's work that met a transient API error), at most
        # one pending per SLMDeployment.
        self._retries: dict[ParentKey, threading.Timer] = {}
        self._retries_guard = threading.Lock()

    def retry_later(self, key: ParentKey, delay: float, work: Callable[[], None]) -> bool:
        """Run `work` after `delay` seconds unless a retry of `key` is already pending (False then)."""
        with self._retries_guard:
            if key in self._retries:
                return False

            def run() -> None:
                with self._retries_guard:
                    self._retries.pop(key, None)
                work()

            timer = threading.Timer(delay, run)
            timer.daemon = True
            self._retries[key] = timer
            timer.start()
            return True

    def cancel_retries(self, keys: Iterable[ParentKey] | None = None) -> None:
        """Cancel the pending retries of `keys` (all when None)."""
        with self._retries_guard:
            for key in list(self._retries) if keys is None else [k for k in keys if k in self._retries]:
                self._retries.pop(key).cancel()

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(namespace, name)]

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept for one SLMDeployment (it was deleted)."""
        key = (namespace, name)
        with self._locks_guard:
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():  # a reconcile still running keeps its lock
                del self._locks[key]
        self.rendered.pop(key, None)
        self.alerts_said.pop(key, None)
        self.parents.discard(key)
        self.cancel_retries([key])

    def keep_only(self, parents: set[ParentKey]) -> None:
        """Drop what is kept for every SLMDeployment not in `parents` (the resync's full listing)."""
        self.parents = set(parents)
        for key in [k for k in list(self.rendered) if k not in parents]:
            self.rendered.pop(key, None)
        for key in [k for k in list(self.alerts_said) if k not in parents]:
            self.alerts_said.pop(key, None)
        with self._locks_guard:
            for key in [k for k, lock in self._locks.items() if k not in parents and not lock.locked()]:
                del self._locks[key]
        with self._retries_guard:
            gone = [k for k in self._retries if k not in parents]
        self.cancel_retries(gone)

    def sizes(self) -> dict[str, int]:
        """How many entries each per-SLMDeployment map holds (the churn benchmark and tests read it)."""
        with self._locks_guard:
            locks = len(self._locks)
        with self._retries_guard:
            retries = len(self._retries)
        return {"rendered": len(self.rendered), "alerts_said": len(self.alerts_said), "locks": locks,
                "parents": len(self.parents),
                "children": sum(self.children.count_by_kind().values()), "retries": retries}

    def _gpu_nodes(self) -> list[tuple[dict[str, str], int]] | None:
        """(labels, allocatable nvidia.com/gpu) per schedulable node; None when nodes cannot be listed."""
        from kubernetes.client.exceptions import ApiException

        try:
            nodes = self.kube.list("Node")
        except ApiException as exc:
            if exc.status == 403:  # RBAC without nodes: skip the check rather than fail
                return None
            raise
        result = []
        for node in nodes:
            if lookup(node, "spec.unschedulable", False):
                continue
            allocatable = lookup(node, "status.allocatable", {}) or {}
            try:
                gpus = int(str(allocatable.get("nvidia.com/gpu", "0")))
            except ValueError:
                gpus = 0
            result.append((dict(lookup(node, "metadata.labels", {}) or {}), gpus))
        return result

    def _prometheus_selectors(self) -> PrometheusSelectors | None:
        """The Prometheus resources' selectors; None when the Prometheus CRD is absent or not readable."""
        from kubernetes.client.exceptions import ApiException

        try:
            items = self.kube.list("Prometheus")
        except ApiException as exc:
            if exc.status == 403:
                return None
            raise
        items.sort(key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"]))
        return PrometheusSelectors(
            prometheuses=tuple(f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in items),
            service_monitor=tuple(lookup(p, "spec.serviceMonitorSelector") for p in items),
            rule=tuple(lookup(p, "spec.ruleSelector") for p in items),
        )
