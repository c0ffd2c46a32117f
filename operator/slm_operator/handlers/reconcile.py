"""Reconcile one SLMDeployment in four steps: desired (render), apply, prune, status.

Synchronous; called from kopf's thread pool by the create/update/resume handlers, the child-event
handlers and the periodic resync. One lock per SLMDeployment serialises concurrent triggers.

Ownership: the operator writes an object only when it carries this SLMDeployment's uid in its
ownerReferences, or does not exist. An object of a child's name that is someone else's is reported
(NameConflict) and left untouched, whatever triggered the reconcile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from slm_operator import metrics, render, selection
from slm_operator.handlers.state import PrometheusSelectors, State
from slm_operator.kube import MONITORING_KINDS, RESOURCES, OwnershipChanged, with_applied_hash
from slm_operator.render import SERVING_KINDS, MonitorLabels, RenderContext
from slm_operator.spec import PARENT_LABEL, Parent, SecretKeyRef, SLMDeploymentSpec, child_names, lookup, parse_spec
from slm_operator.status import (
    ALERTS_UNSUPPORTED,
    MONITORING_READY,
    READY,
    SETTINGS_APPLIED,
    Observation,
    Problem,
    build_status,
    same_status,
)

log = logging.getLogger(__name__)

# Children that exist only for some specs: deleted when the spec stops asking for them.
OPTIONAL_KINDS = ("NetworkPolicy", "ServiceMonitor", "PrometheusRule", "ConfigMap", "AlertmanagerConfig")
CRD_NAMES = {
    "ServiceMonitor": "servicemonitors.monitoring.coreos.com",
    "PrometheusRule": "prometheusrules.monitoring.coreos.com",
    "AlertmanagerConfig": "alertmanagerconfigs.monitoring.coreos.com",
}
# Answers that say "try again", not "this object is wrong".
TRANSIENT_CLIENT_ERRORS = (404, 408, 409, 429)
# Ready=False reasons only a full reconcile finds; a status refresh from a Deployment event keeps them.
FULL_RECONCILE_REASONS = ("NameConflict", "InvalidSpec", "SecretNotFound")


@dataclasses.dataclass
class Desired:
    """Step 1: what the SLMDeployment should own, and what stands in the way."""

    parent: Parent
    spec: SLMDeploymentSpec
    children: list[dict[str, Any]]  # to apply now
    served: frozenset[str]  # Prometheus Operator kinds the API server serves
    serving_problems: list[Problem]
    monitoring_problems: list[Problem]
    settings_problems: list[Problem]

    def keys(self) -> set[tuple[str, str]]:
        return {(c["kind"], c["metadata"]["name"]) for c in self.children}


@dataclasses.dataclass
class Applied:
    """Step 2 and 3: what was written, and what could not be."""

    children: list[dict[str, str]] = dataclasses.field(default_factory=list)  # for status.children
    changes: list[str] = dataclasses.field(default_factory=list)  # for the Applied event
    conflicts: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (kind, name) not ours
    rejected: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (kind, name, message)


# --- step 1: desired ----------------------------------------------------------------------------------

def _monitor_labels(selectors: PrometheusSelectors | None, spec: SLMDeploymentSpec,
                    ) -> tuple[MonitorLabels, list[Problem]]:
    wanted = render.monitor_labels_of(spec)
    if selectors is None:
        return wanted, []
    sm_labels, sm_problem = selection.resolve(wanted.service_monitor, selectors.service_monitor,
                                              selectors.prometheuses, "serviceMonitorSelector")
    rule_labels, rule_problem = selection.resolve(wanted.rule, selectors.rule, selectors.prometheuses, "ruleSelector")
    problems = [Problem("PrometheusSelectorMismatch", p) for p in (sm_problem, rule_problem) if p]
    return MonitorLabels(sm_labels, rule_labels), problems


def _gpu_problem(state: State, spec: SLMDeploymentSpec) -> Problem | None:
    gpus = spec.resources.gpus
    if gpus <= 0:
        return None
    nodes = state.gpu_nodes.get()
    if nodes is None:
        return None
    selector = spec.node_selector or {}
    best = max((n for labels, n in nodes if all(labels.get(k) == v for k, v in selector.items())), default=0)
    if best >= gpus:
        return None
    return Problem(
        "InsufficientGPU",
        f"spec.resources.gpus={gpus} but no schedulable node{' matching spec.nodeSelector' if selector else ''} "
        f"has more than {best} allocatable nvidia.com/gpu",
    )


def _missing_secrets(state: State, namespace: str, refs: list[tuple[str, SecretKeyRef]]) -> list[str]:
    """The references whose Secret does not exist. Reads metadata only: the operator never receives a
    Secret's values, so it cannot check that the key exists (the pod or Alertmanager reports that)."""
    missing = []
    for field, ref in refs:
        try:
            secret = state.kube.get_metadata("Secret", namespace, ref.name)
        except ApiException as exc:
            if exc.status == 403:  # the chart's rbac.secretReferenceChecks=false: the check is skipped
                return []
            raise
        if secret is None:
            missing.append(f"{field}: secret {ref.name!r} not found")
    return missing


def _render_memoized(state: State, parent: Parent, spec: SLMDeploymentSpec, context: RenderContext,
                     ) -> tuple[list[dict[str, Any]], list[str]]:
    """render.desired_children, reusing the last result while the inputs are the same.

    Rendering the rules and the dashboard takes tens of milliseconds; most reconciles (resyncs, child
    events) have unchanged inputs. The result is kept as JSON text (compact, and every caller gets
    its own copy to mutate).
    """
    key = hashlib.sha256(json.dumps(
        [parent.uid, spec.wire(), dataclasses.asdict(context)], sort_keys=True, default=str,
    ).encode()).hexdigest()
    memo_key = (parent.namespace, parent.name)
    cached = state.rendered.get(memo_key)
    if cached is not None and cached[0] == key:
        children, known = json.loads(cached[1])
        return children, known
    problems: list[str] = []

    def on_error(kind: str, exc: Exception) -> None:
        log.error("rendering %s for %s/%s failed", kind, parent.namespace, parent.name, exc_info=exc)
        problems.append(f"{kind} could not be rendered: {type(exc).__name__}: {exc}")

    children = render.desired_children(parent, spec, context, on_error=on_error)
    state.rendered[memo_key] = (key, json.dumps([children, problems]))
    return children, problems


def desired(state: State, parent: Parent, spec: SLMDeploymentSpec) -> Desired:
    served = state.served_kinds.get()  # also when monitoring is off: pruning needs to know what can exist
    for kind in MONITORING_KINDS:
        if kind not in served:
            # Deleting a CRD deletes its objects, and the watch may end before it reports them: a cached
            # copy would later pass for the live object and the monitor would never be recreated.
            state.children.forget_kind(kind)
    monitoring = spec.monitoring.enabled
    monitoring_problems: list[Problem] = []
    labels: MonitorLabels | None = None
    selectors: PrometheusSelectors | None = None
    if monitoring or spec.network_policy.enabled:
        selectors = state.prometheus_selectors.get()
    if monitoring:
        labels, selector_problems = _monitor_labels(selectors, spec)
        monitoring_problems += selector_problems
    context = RenderContext(
        server_image=state.cfg.server_image,
        runtime_images=dict(state.cfg.runtime_images),
        sidecar_image=state.cfg.sidecar_image,
        monitor_labels=labels,
        prometheus_namespaces=tuple(sorted({p.split("/")[0] for p in selectors.prometheuses})) if selectors else (),
        allow_fault_injection=state.cfg.allow_fault_injection,
        allow_full_output_logging=state.cfg.allow_full_output_logging,
    )
    children, render_problems = _render_memoized(state, parent, spec, context)
    monitoring_problems += [Problem("RenderError", p) for p in render_problems]

    missing_crds = sorted(CRD_NAMES[k] for k in MONITORING_KINDS if k not in served) if monitoring else []
    if missing_crds:
        monitoring_problems.insert(0, Problem(
            "PrometheusOperatorCRDsMissing",
            f"Prometheus Operator CRDs not installed: {', '.join(missing_crds)}; serving runs, the monitors are "
            "created as soon as the CRDs appear",
        ))
    missing_secrets = _missing_secrets(state, parent.namespace, spec.secret_refs()) if monitoring else []
    if missing_secrets:
        monitoring_problems.append(Problem("SecretNotFound", "; ".join(missing_secrets)))
    serving_problems = []
    missing_serving_secrets = _missing_secrets(state, parent.namespace, render.serving_secret_refs(spec, context))
    if missing_serving_secrets:
        serving_problems.append(Problem(
            "SecretNotFound", "; ".join(missing_serving_secrets) + " (the serving pods wait for it)"))
    gpu = _gpu_problem(state, spec)
    if gpu is not None:
        serving_problems.append(gpu)
    to_apply = [
        c for c in children
        if not (c["kind"] in MONITORING_KINDS and c["kind"] not in served)
        # The Prometheus Operator would reject an AlertmanagerConfig whose secret is missing.
        and not (c["kind"] == "AlertmanagerConfig" and missing_secrets)
    ]
    return Desired(parent=parent, spec=spec, children=to_apply, served=served, serving_problems=serving_problems,
                   monitoring_problems=monitoring_problems, settings_problems=render.policy_problems(spec, context))


# --- step 2: apply ------------------------------------------------------------------------------------

def _api_message(exc: ApiException) -> str:
    """The API server's own sentence (the Status object's message), else the HTTP reason."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason or exc.status)


def _apply_one(state: State, parent: Parent, child: dict[str, Any]) -> tuple[str, str]:
    """("created" | "updated" | "unchanged" | "conflict" | "rejected", message) for one child."""
    kind, name = child["kind"], child["metadata"]["name"]
    key = (kind, parent.namespace, name)
    live = state.children.get(key)
    for _ in range(2):  # a second time only when the object changed hands between the read and the write
        if live is None or not parent.owns(live):
            # The cache holds only what the label-filtered watches and lists saw: someone else's object
            # of this name is not in it. Read before writing, on every trigger.
            live = state.kube.get(kind, parent.namespace, name)
        if live is not None and not parent.owns(live):
            return "conflict", ""
        try:
            outcome, now = state.kube.apply_object(child, live=live)
        except OwnershipChanged:
            live = None
            continue
        except ApiException as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status not in TRANSIENT_CLIENT_ERRORS \
                    and not namespace_going_away(exc):
                return "rejected", _api_message(exc)
            raise
        if kind in MONITORING_KINDS and now is not None:
            state.children.put(now)  # not watched (see lifecycle.CHILD_RESOURCES): the resync lists them
        return outcome, ""
    return "conflict", ""


def apply(state: State, plan: Desired) -> Applied:
    result = Applied()
    # The children do not depend on each other: apply them concurrently (latency of one, not seven).
    outcomes = list(state.apply_pool.map(lambda child: _apply_one(state, plan.parent, child), plan.children))
    for child, (outcome, message) in zip(plan.children, outcomes, strict=True):
        kind, name = child["kind"], child["metadata"]["name"]
        if outcome == "conflict":
            result.conflicts.append((kind, name))
        elif outcome == "rejected":
            result.rejected.append((kind, name, message))
        else:
            result.children.append({"apiVersion": child["apiVersion"], "kind": kind, "name": name})
            if outcome != "unchanged":
                result.changes.append(f"{outcome} {kind} {name}")
    return result


# --- step 3: prune ------------------------------------------------------------------------------------

def prune(state: State, plan: Desired) -> list[str]:
    """Delete optional children the spec no longer asks for (NetworkPolicy, monitoring or dashboards
    switched off, notifications removed). Only objects this SLMDeployment owns are deleted."""
    parent, changes = plan.parent, []
    wanted = plan.keys()
    names = child_names(parent.name)
    for kind in OPTIONAL_KINDS:
        if (kind, names[kind]) in wanted or (kind in MONITORING_KINDS and kind not in plan.served):
            continue
        key = (kind, parent.namespace, names[kind])
        live = state.children.get(key)
        if live is None:
            continue
        if parent.owns(live) and state.kube.delete(kind, parent.namespace, names[kind],
                                                   uid=lookup(live, "metadata.uid")):
            changes.append(f"deleted {kind} {names[kind]}")
        state.children.forget(key)
    return changes


# --- step 4: status -----------------------------------------------------------------------------------

def _names(namespace: str, objects: list[tuple[str, str]]) -> str:
    return ", ".join(f"{kind} {namespace}/{name}" for kind, name in objects)


def _conflict_problem(namespace: str, conflicts: list[tuple[str, str]]) -> Problem:
    return Problem("NameConflict", f"{_names(namespace, conflicts)} already exists and is not owned by this "
                                   "SLMDeployment; rename or delete it (left untouched)")


def _rejected_problem(namespace: str, rejected: list[tuple[str, str, str]]) -> Problem:
    return Problem("InvalidSpec", "; ".join(
        f"the API server refused {kind} {namespace}/{name}: {message}" for kind, name, message in rejected))


def _current_deployment(state: State, parent: Parent) -> dict[str, Any] | None:
    deployment = state.children.get(("Deployment", parent.namespace, parent.name))
    if deployment is None:
        deployment = state.kube.get("Deployment", parent.namespace, parent.name)
    if deployment is not None and not parent.owns(deployment):
        return None  # someone else's Deployment says nothing about our serving
    return deployment


def report(state: State, body: Mapping[str, Any], plan: Desired, applied: Applied) -> dict[str, Any]:
    parent = plan.parent
    ns = parent.namespace
    serving: list[Problem] = []
    if conflicts := [c for c in applied.conflicts if c[0] in SERVING_KINDS]:
        serving.append(_conflict_problem(ns, conflicts))
    if rejected := [r for r in applied.rejected if r[0] in SERVING_KINDS]:
        serving.append(_rejected_problem(ns, rejected))
    serving += plan.serving_problems
    monitoring = list(plan.monitoring_problems)
    if conflicts := [c for c in applied.conflicts if c[0] not in SERVING_KINDS]:
        monitoring.append(_conflict_problem(ns, conflicts))
    if rejected := [r for r in applied.rejected if r[0] not in SERVING_KINDS]:
        monitoring.append(_rejected_problem(ns, rejected))
    observation = Observation(
        generation=int(body["metadata"].get("generation", 1)),
        desired_replicas=plan.spec.replicas,
        deployment=_current_deployment(state, parent),
        selector=parent.selector,
        endpoint=parent.endpoint,
        children=applied.children,
        monitoring=Problem.combined(monitoring),
        monitoring_message=("monitoring disabled in spec" if not plan.spec.monitoring.enabled
                            else "ServiceMonitor, PrometheusRule and dashboard applied"),
        serving=Problem.combined(serving),
        settings=Problem.combined(plan.settings_problems),
        unsupported_alerts=render.unsupported_alerts(plan.spec),
    )
    return _write_status(state, body, observation)


def _write_status(state: State, body: Mapping[str, Any], observation: Observation) -> dict[str, Any]:
    meta = body["metadata"]
    previous = body.get("status") or {}
    status = build_status(previous, observation)
    if not same_status(previous, status):
        try:
            state.kube.patch_status(meta["namespace"], meta["name"], status)
        except ApiException as exc:
            if exc.status != 404 and not namespace_going_away(exc):  # deleted meanwhile: nothing to report on
                raise
        _post_transition_events(state, body, previous, status)
    return status


def _invalid_spec(state: State, body: Mapping[str, Any], error: ValidationError) -> dict[str, Any]:
    """A spec the CRD let through but this operator cannot read (the CRD and the operator disagree)."""
    parent = Parent.of(body)
    fields = "; ".join(".".join(["spec", *(str(p) for p in e["loc"])]) + f": {e['msg']}" for e in error.errors())
    replicas = (body.get("spec") or {}).get("replicas", 1)
    observation = Observation(
        generation=int(body["metadata"].get("generation", 1)),
        desired_replicas=replicas if isinstance(replicas, int) else 1,
        deployment=_current_deployment(state, parent),
        selector=parent.selector,
        endpoint=parent.endpoint,
        children=list((body.get("status") or {}).get("children") or []),
        serving=Problem("InvalidSpec", f"the operator cannot read this spec ({fields}); nothing was changed"),
    )
    return _write_status(state, body, observation)


def _post_transition_events(state: State, body: Mapping[str, Any], previous: Mapping[str, Any],
                            status: Mapping[str, Any]) -> None:
    """One Event per condition whose status flipped (never one per resync)."""
    before = {c["type"]: c for c in previous.get("conditions", []) or []}
    for cond in status["conditions"]:
        old = before.get(cond["type"])
        if cond["type"] == ALERTS_UNSUPPORTED:
            _say_unsupported_alerts(state, body, old, cond)
            continue
        if old is not None and old.get("status") == cond["status"] and old.get("reason") == cond["reason"]:
            continue
        bad = (cond["type"] in (READY, MONITORING_READY, SETTINGS_APPLIED) and cond["status"] == "False"
               and cond["reason"] not in ("DeploymentMissing", "ReplicasNotReady")) or (
            cond["type"] == "Degraded" and cond["status"] == "True")
        if old is None and not bad:
            continue  # the first status of a new object: the Applied events already tell the story
        message = f"{cond['type']}={cond['status']}: {cond['message']}"
        state.kube.post_event(body, reason=cond["reason"], message=message, warning=bad)


def _say_unsupported_alerts(state: State, body: Mapping[str, Any], old: Mapping[str, Any] | None,
                            cond: Mapping[str, Any]) -> None:
    """One Normal Event when alerts are left out for the runtime (also on the first status), none per resync.

    Two reconciles may start from the same stale copy of the object (a create and a resync, one after the
    other under the lock): what was said is kept per SLMDeployment, so the second says nothing again.
    """
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    said = (str(body["metadata"].get("uid", "")), str(cond["message"]))
    if cond["status"] != "True":
        state.alerts_said.pop(key, None)
        return
    unchanged = old is not None and old.get("status") == "True" and old.get("message") == cond["message"]
    if unchanged or state.alerts_said.get(key) == said:
        return
    state.alerts_said[key] = said
    state.kube.post_event(body, reason=str(cond["reason"]), message=f"{cond['type']}=True: {cond['message']}")


# --- the whole reconcile ------------------------------------------------------------------------------

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


def _reconcile(state: State, body: Mapping[str, Any], *, trigger: str) -> dict[str, Any]:
    parent = Parent.of(body)
    state.parents.add((parent.namespace, parent.name))
    try:
        spec = parse_spec(body.get("spec"))
    except ValidationError as exc:
        return _invalid_spec(state, body, exc)
    plan = desired(state, parent, spec)
    applied = apply(state, plan)
    applied.changes += prune(state, plan)
    status = report(state, body, plan, applied)
    if applied.changes:
        # One Event per reconcile that changed something, none for a no-op resync.
        state.kube.post_event(body, reason="Applied", message="; ".join(applied.changes))
        log.info("reconciled %s/%s (%s): %s", parent.namespace, parent.name, trigger, ", ".join(applied.changes))
    return status


def namespace_going_away(exc: ApiException) -> bool:
    body = str(exc.body or "")
    return (exc.status == 403 and "NamespaceTerminating" in body) or (
        exc.status == 404 and '"kind":"namespaces"' in body.replace(" ", ""))


# --- lighter paths for child events -------------------------------------------------------------------

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


def _kept_serving_problem(previous_status: Mapping[str, Any]) -> Problem | None:
    conditions = previous_status.get("conditions") or []
    ready: Mapping[str, Any] = next((c for c in conditions if c.get("type") == READY), {})
    if ready.get("reason") in FULL_RECONCILE_REASONS:
        return Problem(str(ready["reason"]), str(ready.get("message", "")))
    return None


def _kept(previous_status: Mapping[str, Any], type_: str) -> Problem | None:
    cond: Mapping[str, Any] = next((c for c in previous_status.get("conditions") or [] if c.get("type") == type_), {})
    if cond.get("status") == "False":
        return Problem(str(cond.get("reason", "")), str(cond.get("message", "")))
    return None


def refresh_status(state: State, body: Mapping[str, Any], deployment: Mapping[str, Any]) -> None:
    """Status from a changed child Deployment, without rendering or applying anything.

    The conditions the Deployment does not drive (MonitoringReady, SettingsApplied, a Ready problem
    only a full reconcile finds) and the children list are kept as the last full reconcile wrote them.
    """
    previous = body.get("status") or {}
    if not previous.get("conditions"):
        return  # its first reconcile is still running and writes the whole status
    parent = Parent.of(body)
    try:
        spec = parse_spec(body.get("spec"))
    except ValidationError:
        return  # the full reconcile reports it
    with state.lock(parent.namespace, parent.name):
        monitoring_before: Mapping[str, Any] = next(
            (c for c in previous["conditions"] if c["type"] == MONITORING_READY), {})
        observation = Observation(
            generation=int(body["metadata"].get("generation", 1)),
            desired_replicas=spec.replicas,
            deployment=deployment,
            selector=parent.selector,
            endpoint=parent.endpoint,
            children=list(previous.get("children") or []),
            monitoring=_kept(previous, MONITORING_READY),
            monitoring_message=str(monitoring_before.get("message", "")),
            serving=_kept_serving_problem(previous) or _gpu_problem(state, spec),
            settings=_kept(previous, SETTINGS_APPLIED),
            unsupported_alerts=render.unsupported_alerts(spec),
        )
        _write_status(state, body, observation)


def parent_of(child: Mapping[str, Any]) -> tuple[str, str] | None:
    labels = lookup(child, "metadata.labels", {}) or {}
    parent = labels.get(PARENT_LABEL)
    if not parent:
        return None
    return lookup(child, "metadata.namespace"), parent


def update_managed_gauge(state: State) -> None:
    counts = state.children.count_by_kind()
    for kind in ("Deployment", "Service", "PodDisruptionBudget", *OPTIONAL_KINDS):
        metrics.MANAGED_RESOURCES.labels(kind=kind).set(counts.get(kind, 0))
    metrics.MANAGED_RESOURCES.labels(kind="SLMDeployment").set(len(state.parents))


__all__ = ["RESOURCES", "desired_child", "parent_of", "reconcile", "refresh_status", "update_managed_gauge"]
