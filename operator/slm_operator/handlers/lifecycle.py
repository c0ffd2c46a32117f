"""Operator start-up (kopf tuning, shared state, metrics server), the periodic resync, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from slm_operator import GROUP, PLURAL, VERSION, metrics
from slm_operator.config import OperatorConfig
from slm_operator.handlers import reconcile as rc
from slm_operator.handlers.state import State
from slm_operator.kube import MONITORING_KINDS, Kube, is_subset, load_config
from slm_operator.spec import MANAGED_BY

log = logging.getLogger(__name__)

# Built-in children are watched with a server-side label selector: the operator never streams the
# cluster's other Deployments, Services or ConfigMaps. The Prometheus Operator kinds are NOT watched:
# when their CRDs are deleted, kopf's open watch gets "404 page not found" and the whole operator exits
# (kopf 1.45, APINotFoundError from watch_objs is not caught). They are listed once per resync instead,
# so hand-made drift of a monitor is repaired within one resync period.
CHILD_RESOURCES: tuple[tuple[str, str], ...] = (
    ("apps/v1", "deployments"),
    ("v1", "services"),
    ("v1", "configmaps"),
    ("policy/v1", "poddisruptionbudgets"),
    ("networking.k8s.io/v1", "networkpolicies"),
)
CHILD_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    """All kopf tuning in one place, then the shared state.

    The settings come in kopf's memo (`memo.config`, put there by slm_operator.cli); run as
    `kopf run -m slm_operator.main` they are read from the environment instead.
    """
    cfg: OperatorConfig = getattr(memo, "config", None) or OperatorConfig.from_env()

    # Watch streams: with kopf's defaults (no timeouts) a watch connection silently dropped by a load
    # balancer or an API server restart can hang forever and the operator stops seeing changes (kopf's
    # docs, configuration / "API timeouts", recommend setting both). The server ends each watch after
    # server_timeout; the client gives up slightly later.
    settings.watching.server_timeout = cfg.watch_server_timeout
    settings.watching.client_timeout = cfg.watch_client_timeout
    settings.watching.connect_timeout = 10
    for api_version, plural in CHILD_RESOURCES:
        settings.watching.label_selectors[api_version, plural] = CHILD_SELECTOR
    # Only errors become kopf's own Events; the operator posts its own Events for what it changed
    # (a kopf "Handler succeeded" Event per resync would be a write per resync).
    settings.posting.level = logging.WARNING
    # Progress and diff-base in annotations under our own prefix: kopf's default also writes status.kopf,
    # which the CRD's structural schema prunes (no preserve-unknown-fields), so kopf would never see its
    # own progress and re-run handlers.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # One operator instance per cluster (the chart runs one replica, Recreate strategy): peering needs
    # its own CRDs and write access that the chart does not grant.
    settings.peering.standalone = True
    # Reconciles are synchronous (the official client): size the thread pool for them.
    settings.execution.max_workers = cfg.workers
    # Retry temporary API errors quickly at first, then back off.
    settings.networking.error_backoffs = [1, 2, 5, 10]
    settings.networking.request_timeout = 60

    kube = Kube(load_config(), field_manager=cfg.field_manager)
    memo.state = State(cfg, kube)
    if not getattr(memo, "metrics_started", False):  # kopf may retry startup handlers; the port stays bound
        metrics.serve(cfg.metrics_port, cfg.bind_host)
        memo.metrics_started = True
    log.info("slm-operator configured: resync every %ss, metrics on :%s", cfg.resync_seconds, cfg.metrics_port)


def _list_parents(state: State) -> list[dict[str, Any]]:
    namespaces: tuple[str | None, ...] = state.namespaces or (None,)
    items: list[dict[str, Any]] = []
    for namespace in namespaces:
        items.extend(state.kube.list("SLMDeployment", namespace))
    return items


def _refresh_monitors(state: State) -> None:
    """Cache the operator's ServiceMonitors, PrometheusRules and AlertmanagerConfigs (one LIST per kind)."""
    served = state.served_kinds.get()
    for kind in MONITORING_KINDS:
        if kind not in served:
            state.children.forget_kind(kind)
            continue
        items: list[dict[str, Any]] = []
        for namespace in state.namespaces or (None,):
            items.extend(state.kube.list(kind, namespace, label_selector=CHILD_SELECTOR))
        state.children.replace_kind(kind, items, state.namespaces)


def resync_once(state: State) -> int:
    """Reconcile every SLMDeployment once (drift repair, CRD detection, status); returns how many."""
    parents = _list_parents(state)
    _refresh_monitors(state)
    # Also drops what is kept for SLMDeployments deleted while their deletion event was missed.
    state.keep_only({(p["metadata"]["namespace"], p["metadata"]["name"]) for p in parents})
    count = 0
    for body in parents:
        if body["metadata"].get("deletionTimestamp"):
            continue
        try:
            rc.reconcile(state, body, trigger="resync")
            count += 1
        except ApiException as exc:
            log.warning("resync of %s/%s failed: %s %s", body["metadata"]["namespace"], body["metadata"]["name"],
                        exc.status, exc.reason)
        except Exception:
            log.exception("resync of %s/%s failed", body["metadata"]["namespace"], body["metadata"]["name"])
    rc.update_managed_gauge(state)
    return count


async def resync_forever(state: State, stop: asyncio.Event) -> None:
    """Every resync_seconds, reconcile all SLMDeployments in a worker thread.

    One cluster-wide loop instead of a kopf timer per resource: kopf timers put a finalizer on every
    SLMDeployment, and deletion would then wait for the operator.
    """
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=state.cfg.resync_seconds)
        if stop.is_set():
            break
        try:
            await loop.run_in_executor(None, resync_once, state)
        except Exception:
            log.exception("resync loop iteration failed")


def on_slmdeployment_change(state: State, body: dict[str, Any], reason: str) -> None:
    """create/update/resume: a full reconcile; API trouble becomes a kopf retry, not a crash loop.

    A child the API server refuses (4xx) is not trouble of this kind: the reconcile reports it as
    InvalidSpec and returns, and nothing is retried until the spec changes or the next resync.
    """
    try:
        rc.reconcile(state, body, trigger=reason)
    except ApiException as exc:
        if exc.status in (0, 404, 409, 429, 500, 502, 503, 504) or exc.status is None:
            raise kopf.TemporaryError(f"API server answered {exc.status}: {exc.reason}", delay=2) from exc
        raise


def on_slmdeployment_event(state: State, event_type: str | None, body: dict[str, Any]) -> None:
    """Forget an SLMDeployment's per-resource state once it is deleted (its children go with the
    garbage collector)."""
    if event_type == "DELETED":
        meta = body["metadata"]
        state.forget(meta["namespace"], meta["name"])


# Answers that say "the API server is not there right now", not "this is wrong".
TRANSIENT_STATUSES = (0, 429, 500, 502, 503, 504)
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # then every 30 s until it succeeds or the SLMDeployment is gone


def child_event(state: State, event_type: str | None, body: dict[str, Any]) -> None:
    """A child event; when its reconcile or status refresh meets a transient API error (the API server
    restarting, etcd stalled), the parent's reconcile is retried later. kopf does not retry event
    handlers, and the child may send no further event (a finished rollout): without this the work
    would wait for the next resync."""
    try:
        _child_event(state, event_type, body)
    except ApiException as exc:
        owner = rc.parent_of(body)
        if owner is None or (exc.status or 0) not in TRANSIENT_STATUSES:
            raise
        log.warning("child event of %s/%s failed (%s %s); retrying its reconcile", owner[0], owner[1],
                    exc.status, exc.reason)
        _retry_reconcile(state, owner, attempt=0)


def _retry_reconcile(state: State, owner: tuple[str, str], attempt: int) -> None:
    def work() -> None:
        try:
            parent = state.kube.get("SLMDeployment", owner[0], owner[1])
            if parent is None or parent["metadata"].get("deletionTimestamp"):
                return
            rc.reconcile(state, parent, trigger="retry")
        except ApiException as exc:
            if (exc.status or 0) in TRANSIENT_STATUSES:
                _retry_reconcile(state, owner, attempt + 1)
            else:
                log.warning("retried reconcile of %s/%s failed: %s %s", owner[0], owner[1], exc.status, exc.reason)
        except Exception:
            log.exception("retried reconcile of %s/%s failed", owner[0], owner[1])

    state.retry_later(owner, RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)], work)


def _child_event(state: State, event_type: str | None, body: dict[str, Any]) -> None:
    """Keep the child cache current; reconcile the parent when a child is gone, drifted, or reports status."""
    key = (body.get("kind", ""), body["metadata"]["namespace"], body["metadata"]["name"])
    previous = state.children.get(key)
    if event_type == "DELETED":
        state.children.forget(key)
    else:
        state.children.put(body)
    owner = rc.parent_of(body)
    if owner is None or event_type is None:
        # event_type None is kopf's initial listing: the resume handlers and the resync cover those.
        return
    desired = rc.desired_child(state, key)
    matches = event_type != "DELETED" and desired is not None and is_subset(desired, body)
    if matches and (key[0] != "Deployment" or (
            previous is not None and _rollout_summary(previous) == _rollout_summary(body))):
        return  # our own write echoing back, or a change the status does not show: nothing to do
    parent = state.kube.get("SLMDeployment", owner[0], owner[1])
    if parent is None or parent["metadata"].get("deletionTimestamp"):
        return  # the parent is going away; the garbage collector removes the rest
    if matches:
        rc.refresh_status(state, parent, body)  # only the rollout moved: no render, no apply
    else:
        rc.reconcile(state, parent, trigger="child")


def _rollout_summary(deployment: dict[str, Any]) -> tuple[Any, ...]:
    """The parts of a Deployment the SLMDeployment status is computed from."""
    status = deployment.get("status") or {}
    return (
        deployment["metadata"].get("generation"), status.get("observedGeneration"), status.get("replicas"),
        status.get("readyReplicas"), status.get("updatedReplicas"),
        tuple((c.get("type"), c.get("status"), c.get("reason")) for c in status.get("conditions") or []),
    )


async def cleanup(memo: kopf.Memo) -> None:
    stop: asyncio.Event | None = getattr(memo, "resync_stop", None)
    task: asyncio.Task[None] | None = getattr(memo, "resync_task", None)
    if stop is not None:
        stop.set()
    state: State | None = getattr(memo, "state", None)
    if state is not None:
        state.cancel_retries()
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, timeout=5)


def start_resync(memo: kopf.Memo) -> None:
    memo.resync_stop = asyncio.Event()
    memo.resync_task = asyncio.get_running_loop().create_task(resync_forever(memo.state, memo.resync_stop))


__all__ = ["CHILD_RESOURCES", "GROUP", "PLURAL", "VERSION", "child_event", "cleanup", "configure",
           "on_slmdeployment_event", "resync_once", "start_resync"]
