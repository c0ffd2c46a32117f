"""Reconcile one SLMDeployment: render its children, apply what differs, prune, write status.

Synchronous; called from kopf's thread pool by the create/update/resume handlers, the child-event
handlers and the periodic resync. One lock per SLMDeployment serialises concurrent triggers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from slm_operator import metrics, render, selection
from slm_operator.handlers.state import State
from slm_operator.kube import MONITORING_KINDS, RESOURCES, with_applied_hash
from slm_operator.spec import PARENT_LABEL, Parent, child_names, get
from slm_operator.status import MONITORING_READY, READY, Observation, Problem, build_status, same_status

log = logging.getLogger(__name__)

SERVING_KINDS = ("Deployment", "Service", "PodDisruptionBudget")
OPTIONAL_KINDS = ("ServiceMonitor", "PrometheusRule", "ConfigMap", "AlertmanagerConfig")
CRD_NAMES = {
    "ServiceMonitor": "servicemonitors.monitoring.coreos.com",
    "PrometheusRule": "prometheusrules.monitoring.coreos.com",
    "AlertmanagerConfig": "alertmanagerconfigs.monitoring.coreos.com",
}


def _monitor_labels(state: State, spec: Mapping[str, Any]) -> tuple[render.MonitorLabels, list[str]]:
    selectors = state.prometheus_selectors.get()
    sm_wanted = get(spec, "monitoring.prometheus.serviceMonitorLabels", {}) or {}
    rule_wanted = get(spec, "monitoring.prometheus.ruleLabels", {}) or {}
    if selectors is None:
        return render.MonitorLabels(dict(sm_wanted), dict(rule_wanted)), []
    sm_labels, sm_problem = selection.resolve(sm_wanted, selectors.service_monitor, selectors.prometheuses,
                                              "serviceMonitorSelector")
    rule_labels, rule_problem = selection.resolve(rule_wanted, selectors.rule, selectors.prometheuses, "ruleSelector")
    return render.MonitorLabels(sm_labels, rule_labels), [p for p in (sm_problem, rule_problem) if p]


def _foreign(live: Mapping[str, Any], uid: str) -> bool:
    """An object of a child's name that neither this operator manages nor this SLMDeployment owns."""
    labels = get(live, "metadata.labels", {}) or {}
    owners = get(live, "metadata.ownerReferences", []) or []
    return labels.get("app.kubernetes.io/managed-by") != "slm-operator" and not any(
        o.get("uid") == uid for o in owners)


def _conflict_message(namespace: str, conflicts: list[tuple[str, str]]) -> str:
    names = ", ".join(f"{kind} {namespace}/{name}" for kind, name in conflicts)
    return f"{names} already exists and is not managed by slm-operator; rename or delete it (left untouched)"


def _gpu_problem(state: State, spec: Mapping[str, Any]) -> Problem | None:
    gpus = int(get(spec, "resources.gpus", 1))
    if gpus <= 0:
        return None
    nodes = state.gpu_nodes.get()
    if nodes is None:
        return None
    selector = get(spec, "nodeSelector", {}) or {}
    best = max((n for labels, n in nodes if all(labels.get(k) == v for k, v in selector.items())), default=0)
    if best >= gpus:
        return None
    return Problem(
        "InsufficientGPU",
        f"spec.resources.gpus={gpus} but no schedulable node{' matching spec.nodeSelector' if selector else ''} "
        f"has more than {best} allocatable nvidia.com/gpu",
    )


def _missing_secrets(state: State, namespace: str, spec: Mapping[str, Any]) -> list[str]:
    from kubernetes.client.exceptions import ApiException

    missing = []
    for field, name, key in render.secret_refs(spec):
        try:
            secret = state.kube.get("Secret", namespace, name)
        except ApiException as exc:
            if exc.status == 403:  # the chart's rbac.secretReferenceChecks=false: the check is skipped
                return []
            raise
        if secret is None:
            missing.append(f"{field}: secret {name!r} not found")
        elif key not in (secret.get("data") or {}) and key not in (secret.get("stringData") or {}):
            missing.append(f"{field}: key {key!r} not in secret {name!r}")
    return missing


def _render(state: State, parent: Parent, spec: Mapping[str, Any], labels: render.MonitorLabels,
            ) -> tuple[list[dict[str, Any]], list[str]]:
    """Children to apply, and rendering problems of the monitoring content (serving never waits on them)."""
    children = [
        render.render_deployment(parent, spec, server_image=state.cfg.server_image),
        render.render_service(parent),
        render.render_pod_disruption_budget(parent),
    ]
    problems: list[str] = []
    if not get(spec, "monitoring.enabled", True):
        return children, problems
    renderers: list[tuple[str, Any]] = [
        ("ServiceMonitor", lambda: render.render_service_monitor(parent, spec, labels)),
        ("PrometheusRule", lambda: render.render_prometheus_rule(parent, spec, labels)),
    ]
    if get(spec, "monitoring.dashboards.enabled", True):
        renderers.append(("ConfigMap", lambda: render.render_dashboard_config_map(parent, spec)))
    renderers.append(("AlertmanagerConfig", lambda: render.render_alertmanager_config(parent, spec, labels)))
    for kind, fn in renderers:
        try:
            obj = fn()
        except Exception as exc:  # a bug in content rendering must not stop serving
            log.exception("rendering %s for %s/%s failed", kind, parent.namespace, parent.name)
            problems.append(f"{kind} could not be rendered: {type(exc).__name__}: {exc}")
            continue
        if obj is not None:
            children.append(obj)
    return children, problems


def _render_memoized(state: State, parent: Parent, spec: Mapping[str, Any], labels: render.MonitorLabels,
                     ) -> tuple[list[dict[str, Any]], list[str]]:
    """`_render`, reusing the last result while the inputs are the same.

    Rendering the rules and the dashboard takes tens of milliseconds; most reconciles (resyncs, child
    events) have unchanged inputs. The result is kept as JSON text (compact, and every caller gets
    its own copy to mutate).
    """
    key = hashlib.sha256(json.dumps(
        [parent.uid, spec, dict(labels.service_monitor), dict(labels.rule), state.cfg.server_image],
        sort_keys=True, default=str).encode()).hexdigest()
    memo_key = (parent.namespace, parent.name)
    cached = state.rendered.get(memo_key)
    if cached is not None and cached[0] == key:
        children, problems = json.loads(cached[1])
        return children, problems
    children, problems = _render(state, parent, spec, labels)
    state.rendered[memo_key] = (key, json.dumps([children, problems]))
    return children, problems


def desired_child(state: State, key: tuple[str, str, str]) -> dict[str, Any] | None:
    """What the operator last rendered for child `key` (kind, namespace, name), with its applied hash."""
    kind, namespace, name = key
    parent = next((p for p in (name, name.removesuffix("-dashboard")) if (namespace, p) in state.rendered), None)
    if parent is None:
        return None
    children, _ = json.loads(state.rendered[(namespace, parent)][1])
    for child in children:
        if child["kind"] == kind and child["metadata"]["name"] == name:
            return with_applied_hash(child)
    return None


def reconcile(state: State, body: Mapping[str, Any], *, trigger: str) -> dict[str, Any]:
    """Bring one SLMDeployment's children and status in line with its spec; returns the status."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    started = time.monotonic()
    try:
        with state.lock(namespace, name):
            result = _reconcile(state, body, trigger=trigger)
    except ApiException as exc:
        if namespace_going_away(exc):
            # The namespace is being deleted: its SLMDeployments go with it, nothing to repair.
            metrics.RECONCILES.labels(trigger=trigger, result="namespace_terminating").inc()
            return {}
        metrics.RECONCILES.labels(trigger=trigger, result="error").inc()
        metrics.RECONCILE_ERRORS.labels(error=f"ApiException{exc.status}").inc()
        raise
    except Exception as exc:
        metrics.RECONCILES.labels(trigger=trigger, result="error").inc()
        metrics.RECONCILE_ERRORS.labels(error=type(exc).__name__).inc()
        raise
    finally:
        metrics.RECONCILE_DURATION.labels(trigger=trigger).observe(time.monotonic() - started)
    metrics.RECONCILES.labels(trigger=trigger, result="ok").inc()
    return result


def namespace_going_away(exc: ApiException) -> bool:
    body = str(exc.body or "")
    return (exc.status == 403 and "NamespaceTerminating" in body) or (
        exc.status == 404 and '"kind":"namespaces"' in body.replace(" ", ""))


def _kept_conflict(previous_status: Mapping[str, Any]) -> Problem | None:
    conditions = previous_status.get("conditions") or []
    ready: Mapping[str, Any] = next((c for c in conditions if c.get("type") == "Ready"), {})
    if ready.get("reason") == "NameConflict":
        return Problem("NameConflict", str(ready.get("message", "")))
    return None


def refresh_status(state: State, body: Mapping[str, Any], deployment: Mapping[str, Any]) -> None:
    """Status from a changed child Deployment, without rendering or applying anything.

    The conditions the Deployment does not drive (MonitoringReady) and the children list are kept
    as the last full reconcile wrote them.
    """
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    previous = body.get("status") or {}
    if not previous.get("conditions"):
        return  # its first reconcile is still running and writes the whole status
    started = time.monotonic()
    with state.lock(namespace, name):
        spec: Mapping[str, Any] = body.get("spec") or {}
        parent = Parent(name=name, namespace=namespace, uid=meta["uid"])
        monitoring_before: dict[str, Any] = next(
            (c for c in previous["conditions"] if c["type"] == MONITORING_READY), {})
        problem = None
        if monitoring_before.get("status") == "False":
            problem = Problem(monitoring_before.get("reason", ""), monitoring_before.get("message", ""))
        observation = Observation(
            generation=int(meta.get("generation", 1)),
            desired_replicas=int(get(spec, "replicas", 1)),
            deployment=deployment,
            selector=",".join(f"{k}={v}" for k, v in sorted(parent.selector_labels().items())),
            endpoint=parent.endpoint,
            children=list(previous.get("children") or []),
            monitoring=problem,
            monitoring_message=monitoring_before.get("message", ""),
            # A name conflict is found only by a full reconcile (it applies children); keep it until
            # the next one rather than let a Deployment event paper over it.
            serving=_kept_conflict(previous) or _gpu_problem(state, spec),
        )
        status = build_status(previous, observation)
        if not same_status(previous, status):
            try:
                state.kube.patch_status(namespace, name, status)
            except ApiException as exc:
                if exc.status != 404 and not namespace_going_away(exc):
                    raise
            _post_transition_events(state, body, previous, status)
    metrics.RECONCILES.labels(trigger="status", result="ok").inc()
    metrics.RECONCILE_DURATION.labels(trigger="status").observe(time.monotonic() - started)


def _reconcile(state: State, body: Mapping[str, Any], *, trigger: str) -> dict[str, Any]:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    spec: Mapping[str, Any] = body.get("spec") or {}
    parent = Parent(name=name, namespace=namespace, uid=meta["uid"])
    generation = int(meta.get("generation", 1))
    state.parents.add((namespace, name))
    kube = state.kube

    monitoring_enabled = bool(get(spec, "monitoring.enabled", True))
    served = state.served_kinds.get()  # also when disabled: pruning needs to know what can exist
    for kind in MONITORING_KINDS:
        if kind not in served:
            # Deleting a CRD deletes its objects, and the watch may end before it reports them: a cached
            # copy would later pass for the live object and the monitor would never be recreated.
            state.children.forget_kind(kind)
    monitoring_problems: list[tuple[str, str]] = []  # (reason, message)
    labels = render.MonitorLabels()
    if monitoring_enabled:
        labels, selector_problems = _monitor_labels(state, spec)
        monitoring_problems += [("PrometheusSelectorMismatch", p) for p in selector_problems]
    children, render_problems = _render_memoized(state, parent, spec, labels)
    monitoring_problems += [("RenderError", p) for p in render_problems]

    missing_crds = sorted(CRD_NAMES[k] for k in MONITORING_KINDS if k not in served) if monitoring_enabled else []
    if missing_crds:
        monitoring_problems.insert(0, (
            "PrometheusOperatorCRDsMissing",
            f"Prometheus Operator CRDs not installed: {', '.join(missing_crds)}; serving runs, the monitors are "
            "created as soon as the CRDs appear",
        ))
    missing_secrets = _missing_secrets(state, namespace, spec) if monitoring_enabled else []
    if missing_secrets:
        monitoring_problems.append(("SecretNotFound", "; ".join(missing_secrets)))

    applied: list[dict[str, str]] = []
    changes: list[str] = []
    desired_keys: set[tuple[str, str]] = set()
    to_apply = [
        c for c in children
        if not (c["kind"] in MONITORING_KINDS and c["kind"] not in served)
        # The Prometheus Operator would reject an AlertmanagerConfig whose secret is missing.
        and not (c["kind"] == "AlertmanagerConfig" and missing_secrets)
    ]

    def apply_one(child: dict[str, Any]) -> str:
        kind, child_name = child["kind"], child["metadata"]["name"]
        key = (kind, namespace, child_name)
        live = state.children.get(key)
        # Built-in children are watched (label-filtered): on an update a cache miss means "does not exist
        # yet", so apply straight away. Everything else reads first: a resync must not turn a cold cache
        # into writes, and a create must not take over someone else's object of the same name (it would
        # not carry our label, so the watch never shows it).
        if live is None and (trigger != "update" or kind in MONITORING_KINDS):
            live = kube.get(kind, namespace, child_name)
        if live is not None and _foreign(live, parent.uid):
            return "conflict"
        outcome, now = kube.apply_object(child, live=live, fetch=False)
        if kind in MONITORING_KINDS and now is not None:
            state.children.put(now)  # not watched (see lifecycle.CHILD_RESOURCES): the resync lists them
        return outcome

    # The children do not depend on each other: apply them concurrently (latency of one, not six).
    outcomes = list(state.apply_pool.map(apply_one, to_apply))
    conflicts: list[tuple[str, str]] = []
    for child, outcome in zip(to_apply, outcomes, strict=True):
        kind, child_name = child["kind"], child["metadata"]["name"]
        desired_keys.add((kind, child_name))
        if outcome == "conflict":
            conflicts.append((kind, child_name))
            continue
        applied.append({"apiVersion": child["apiVersion"], "kind": kind, "name": child_name})
        if outcome != "unchanged":
            changes.append(f"{outcome} {kind} {child_name}")

    # Prune optional children the spec no longer asks for (monitoring or dashboards switched off,
    # notifications removed). Only objects this SLMDeployment owns are deleted.
    names = child_names(name)
    for kind in OPTIONAL_KINDS:
        if (kind, names[kind]) in desired_keys or (kind in MONITORING_KINDS and kind not in served):
            continue
        key = (kind, namespace, names[kind])
        live = state.children.get(key)
        if live is None:
            continue
        owners = get(live, "metadata.ownerReferences", []) or []
        if any(o.get("uid") == parent.uid for o in owners) and kube.delete(
            kind, namespace, names[kind], uid=get(live, "metadata.uid")
        ):
            changes.append(f"deleted {kind} {names[kind]}")
        state.children.forget(key)

    deployment = state.children.get(("Deployment", namespace, name))
    if deployment is None:
        deployment = kube.get("Deployment", namespace, name)

    monitoring: Problem | None = None
    serving_conflicts = [c for c in conflicts if c[0] in SERVING_KINDS]
    monitoring_problems += [("NameConflict", _conflict_message(namespace, [c])) for c in conflicts
                            if c[0] not in SERVING_KINDS]
    if monitoring_problems:
        monitoring = Problem(monitoring_problems[0][0], "; ".join(m for _, m in monitoring_problems))
    observation = Observation(
        generation=generation,
        desired_replicas=int(get(spec, "replicas", 1)),
        deployment=deployment,
        selector=",".join(f"{k}={v}" for k, v in sorted(parent.selector_labels().items())),
        endpoint=parent.endpoint,
        children=applied,
        monitoring=monitoring,
        monitoring_message=("monitoring disabled in spec" if not monitoring_enabled
                            else "ServiceMonitor, PrometheusRule and dashboard applied"),
        serving=(Problem("NameConflict", _conflict_message(namespace, serving_conflicts)) if serving_conflicts
                 else _gpu_problem(state, spec)),
    )
    previous = body.get("status") or {}
    status = build_status(previous, observation)
    if not same_status(previous, status):
        try:
            kube.patch_status(namespace, name, status)
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing left to report on
                raise
        _post_transition_events(state, body, previous, status)
    if changes:
        # One Event per reconcile that changed something, none for a no-op resync.
        state.kube.post_event(body, reason="Applied", message="; ".join(changes))
        log.info("reconciled %s/%s (%s): %s", namespace, name, trigger, ", ".join(changes))
    return status


def _post_transition_events(state: State, body: Mapping[str, Any], previous: Mapping[str, Any],
                            status: Mapping[str, Any]) -> None:
    """One Event per condition whose status flipped (never one per resync)."""
    before = {c["type"]: c for c in previous.get("conditions", []) or []}
    for cond in status["conditions"]:
        old = before.get(cond["type"])
        if old is not None and old.get("status") == cond["status"] and old.get("reason") == cond["reason"]:
            continue
        bad = (cond["type"] in (READY, MONITORING_READY) and cond["status"] == "False" and cond["reason"] not in (
            "DeploymentMissing", "ReplicasNotReady")) or (cond["type"] == "Degraded" and cond["status"] == "True")
        if old is None and not bad:
            continue  # the first status of a new object: the Applied events already tell the story
        message = f"{cond['type']}={cond['status']}: {cond['message']}"
        state.kube.post_event(body, reason=cond["reason"], message=message, warning=bad)


def parent_of(child: Mapping[str, Any]) -> tuple[str, str] | None:
    labels = get(child, "metadata.labels", {}) or {}
    parent = labels.get(PARENT_LABEL)
    if not parent:
        return None
    return get(child, "metadata.namespace"), parent


def update_managed_gauge(state: State) -> None:
    counts = state.children.count_by_kind()
    for kind in ("Deployment", "Service", "PodDisruptionBudget", *OPTIONAL_KINDS):
        metrics.MANAGED_RESOURCES.labels(kind=kind).set(counts.get(kind, 0))
    metrics.MANAGED_RESOURCES.labels(kind="SLMDeployment").set(len(state.parents))


__all__ = ["RESOURCES", "desired_child", "parent_of", "reconcile", "refresh_status", "update_managed_gauge"]
