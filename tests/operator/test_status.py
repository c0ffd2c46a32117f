"""Status is what `kubectl get slmd` and the SRE read: phase, replicas and conditions."""

from __future__ import annotations

from typing import Any

from slm_operator.status import Observation, Problem, build_status, same_status


def deployment(replicas: int, ready: int, generation: int = 1, observed: int = 1, updated: int | None = None,
               conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas if updated is None
                   else updated, "observedGeneration": observed, "conditions": conditions or []},
    }


def observe(dep: dict[str, Any] | None, desired: int = 2, **kwargs: Any) -> Observation:
    return Observation(generation=3, desired_replicas=desired, deployment=dep, selector="a=b",
                       endpoint="http://x.ns.svc:8000", children=[{"kind": "Deployment", "name": "x"}], **kwargs)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_all_replicas_ready_is_phase_ready() -> None:
    status = build_status(None, observe(deployment(2, 2)), now="t0")
    assert status["phase"] == "Ready" and status["readyReplicas"] == 2 and status["observedGeneration"] == 3
    assert conditions(status) == {"Ready": ("True", "AllReplicasReady"), "Progressing": ("False", "Stable"),
                                  "MonitoringReady": ("True", "MonitorsApplied"), "Degraded": ("False", "AsExpected"),
                                  "SettingsApplied": ("True", "AsRequested"),
                                  "AlertsUnsupported": ("False", "AllAlertsRendered")}
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_rollout_in_progress_and_missing_deployment() -> None:
    assert build_status(None, observe(deployment(2, 1)))["phase"] == "Progressing"
    assert build_status(None, observe(deployment(2, 2, generation=2, observed=1)))["phase"] == "Progressing"
    pending = build_status(None, observe(None))
    assert pending["phase"] == "Pending" and conditions(pending)["Ready"] == ("False", "DeploymentMissing")


def test_missing_crds_keep_serving_ready_but_monitoring_not() -> None:
    problem = Problem("PrometheusOperatorCRDsMissing", "Prometheus Operator CRDs not installed: servicemonitors")
    status = build_status(None, observe(deployment(2, 2), monitoring=problem))
    assert status["phase"] == "Ready"
    assert conditions(status)["MonitoringReady"] == ("False", "PrometheusOperatorCRDsMissing")


def test_unsatisfiable_gpu_request_is_failed_with_reason() -> None:
    status = build_status(None, observe(deployment(2, 0), serving=Problem("InsufficientGPU", "no node")))
    assert status["phase"] == "Failed"
    assert conditions(status)["Ready"] == ("False", "InsufficientGPU")
    assert conditions(status)["Degraded"] == ("True", "InsufficientGPU")


def test_stuck_rollout_is_degraded() -> None:
    stuck = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "slow"}]
    status = build_status(None, observe(deployment(2, 1, conditions=stuck)))
    assert status["phase"] == "Degraded" and conditions(status)["Degraded"] == ("True", "RolloutStuck")


def test_transition_time_moves_only_when_status_flips_so_a_resync_writes_nothing() -> None:
    first = build_status(None, observe(deployment(2, 1)), now="t0")
    again = build_status(first, observe(deployment(2, 1)), now="t1")
    assert again == first and same_status(first, again)
    ready = build_status(first, observe(deployment(2, 2)), now="t2")
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times["Ready"] == "t2" and times["Progressing"] == "t2" and times["MonitoringReady"] == "t0"
    assert not same_status(first, ready)


def test_scaled_to_zero_is_ready() -> None:
    status = build_status(None, observe(deployment(0, 0), desired=0))
    assert status["phase"] == "Ready" and conditions(status)["Ready"] == ("True", "ScaledToZero")


def test_a_setting_left_out_is_its_own_condition_and_serving_stays_ready() -> None:
    problem = Problem("FaultInjectionNotAllowed", "spec.server.faultsAdmin is true but ...")
    status = build_status(None, observe(deployment(2, 2), settings=problem))
    assert status["phase"] == "Ready"
    assert conditions(status)["SettingsApplied"] == ("False", "FaultInjectionNotAllowed")


def test_alerts_left_out_for_the_runtime_are_a_condition_that_keeps_serving_ready() -> None:
    problem = Problem("RuntimeLacksSignals", "1 alert(s) not rendered for runtime tgi, ...")
    status = build_status(None, observe(deployment(2, 2), unsupported_alerts=problem))
    assert status["phase"] == "Ready"
    assert conditions(status)["AlertsUnsupported"] == ("True", "RuntimeLacksSignals")
    assert conditions(status)["MonitoringReady"] == ("True", "MonitorsApplied")
