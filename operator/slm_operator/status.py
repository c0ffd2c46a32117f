"""SLMDeployment status: conditions in the usual Kubernetes shape, computed purely from observations."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

READY = "Ready"
PROGRESSING = "Progressing"
MONITORING_READY = "MonitoringReady"
DEGRADED = "Degraded"
# False when the operator leaves out a setting the spec asks for (an operator-level gate is off).
SETTINGS_APPLIED = "SettingsApplied"
# True when alerts of the spec are not rendered because the runtime lacks the series they read (the message
# names each alert and why); False when every alert the spec enables is in the PrometheusRule.
ALERTS_UNSUPPORTED = "AlertsUnsupported"
CONDITION_TYPES = (READY, PROGRESSING, MONITORING_READY, DEGRADED, SETTINGS_APPLIED, ALERTS_UNSUPPORTED)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something wrong the user must fix (a reason in CamelCase and a sentence)."""

    reason: str
    message: str

    @classmethod
    def combined(cls, problems: Sequence[Problem]) -> Problem | None:
        """One problem for a condition: the first one's reason, every message."""
        if not problems:
            return None
        return cls(problems[0].reason, "; ".join(p.message for p in problems))


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one reconcile saw, the input of build_status."""

    generation: int
    desired_replicas: int
    deployment: Mapping[str, Any] | None
    selector: str
    endpoint: str
    children: Sequence[Mapping[str, str]]
    monitoring: Problem | None = None  # None: monitoring applied (or disabled)
    monitoring_message: str = "ServiceMonitor, PrometheusRule and dashboard applied"
    serving: Problem | None = None  # e.g. InsufficientGPU: no node can ever run the pods
    settings: Problem | None = None  # e.g. FaultInjectionNotAllowed: a spec setting left out
    unsupported_alerts: Problem | None = None  # e.g. RuntimeLacksSignals: alerts left out of the PrometheusRule


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    previous: Sequence[Mapping[str, Any]], type_: str, status: bool, reason: str, message: str, generation: int,
    now: str,
) -> dict[str, Any]:
    """A condition; lastTransitionTime moves only when the status flips."""
    status_text = "True" if status else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    transition = before["lastTransitionTime"] if before and before.get("status") == status_text and before.get(
        "lastTransitionTime") else now
    return {
        "type": type_,
        "status": status_text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
        "observedGeneration": generation,
    }


def _deployment_condition(deployment: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for cond in deployment.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def build_status(previous: Mapping[str, Any] | None, obs: Observation, now: str | None = None) -> dict[str, Any]:
    """The full status for `obs`; equal to `previous` when nothing changed (so no write is needed)."""
    now = now or now_rfc3339()
    prev_conditions = list((previous or {}).get("conditions", []) or [])
    dep = obs.deployment
    dep_status: Mapping[str, Any] = (dep or {}).get("status", {}) or {}
    replicas = int(dep_status.get("replicas", 0) or 0)
    ready = int(dep_status.get("readyReplicas", 0) or 0)
    updated = int(dep_status.get("updatedReplicas", 0) or 0)
    dep_generation_seen = dep is not None and int(dep_status.get("observedGeneration", 0) or 0) >= int(
        dep.get("metadata", {}).get("generation", 0) or 0)

    # Progressing: a rollout (or scale) of the serving Deployment is under way.
    rolling = dep is None or not dep_generation_seen or updated < obs.desired_replicas or replicas > ready or (
        ready < obs.desired_replicas)
    stuck = dep is not None and _deployment_condition(dep, "Progressing").get("reason") == "ProgressDeadlineExceeded"
    replica_failure = dep is not None and _deployment_condition(dep, "ReplicaFailure").get("status") == "True"

    degraded: Problem | None = obs.serving
    if degraded is None and stuck:
        degraded = Problem("RolloutStuck", _deployment_condition(dep or {}, "Progressing").get("message", ""))
    if degraded is None and replica_failure:
        degraded = Problem("ReplicaFailure", _deployment_condition(dep or {}, "ReplicaFailure").get("message", ""))

    is_ready = dep is not None and dep_generation_seen and ready >= obs.desired_replicas and obs.serving is None
    if obs.serving is not None:
        ready_reason, ready_message = obs.serving.reason, obs.serving.message
    elif dep is None:
        ready_reason, ready_message = "DeploymentMissing", "the serving Deployment does not exist yet"
    elif is_ready:
        ready_reason = "ScaledToZero" if obs.desired_replicas == 0 else "AllReplicasReady"
        ready_message = f"{ready}/{obs.desired_replicas} serving pods ready"
    else:
        ready_reason, ready_message = "ReplicasNotReady", f"{ready}/{obs.desired_replicas} serving pods ready"

    if obs.serving is not None:
        phase = "Failed"
    elif is_ready:
        phase = "Ready"
    elif degraded is not None:
        phase = "Degraded"
    elif dep is None:
        phase = "Pending"
    else:
        phase = "Progressing"

    gen = obs.generation
    conditions = [
        condition(prev_conditions, READY, is_ready, ready_reason, ready_message, gen, now),
        condition(
            prev_conditions, PROGRESSING, rolling and obs.serving is None,
            "RollingOut" if rolling else "Stable",
            f"{updated} updated, {ready} ready of {obs.desired_replicas} desired" if rolling else "rollout complete",
            gen, now,
        ),
        condition(
            prev_conditions, MONITORING_READY, obs.monitoring is None,
            obs.monitoring.reason if obs.monitoring else "MonitorsApplied",
            obs.monitoring.message if obs.monitoring else obs.monitoring_message,
            gen, now,
        ),
        condition(
            prev_conditions, DEGRADED, degraded is not None,
            degraded.reason if degraded else "AsExpected",
            degraded.message if degraded else "no problem detected",
            gen, now,
        ),
        condition(
            prev_conditions, SETTINGS_APPLIED, obs.settings is None,
            obs.settings.reason if obs.settings else "AsRequested",
            obs.settings.message if obs.settings else "every setting of the spec is applied",
            gen, now,
        ),
        condition(
            prev_conditions, ALERTS_UNSUPPORTED, obs.unsupported_alerts is not None,
            obs.unsupported_alerts.reason if obs.unsupported_alerts else "AllAlertsRendered",
            obs.unsupported_alerts.message if obs.unsupported_alerts else "every enabled alert is rendered",
            gen, now,
        ),
    ]
    return {
        "observedGeneration": gen,
        "phase": phase,
        "replicas": replicas,
        "readyReplicas": ready,
        "selector": obs.selector,
        "endpoint": obs.endpoint,
        "children": [dict(c) for c in obs.children],
        "conditions": conditions,
    }


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Whether a status patch would change nothing the operator owns."""
    a = a or {}
    return all(a.get(key) == value for key, value in b.items())
