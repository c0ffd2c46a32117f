"""Unit tests of the rendered PrometheusRule groups (structure; behaviour is in test_rules_promtool.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from slm_operator.monitoring import rules
from slm_operator.monitoring.defaults import ALERT_DEFAULTS, SEVERITIES, merged_alerts
from slm_operator.monitoring.rules import ALERT_NAMES, render_rule_groups

REPO = Path(__file__).resolve().parents[2]
CONTRACT_ALERTS = {
    "SLMHighErrorRate", "SLMSlowResponseTime", "SLMHighGPUUtilization", "SLMLowDiskSpace", "SLMHighGPUMemory",
    "SLMGPUXidErrors", "SLMGPUMetricsAbsent", "SLMTargetDown", "SLMPodCrashLooping", "SLMPodNotReady",
    "SLMHighTimeToFirstToken", "SLMQueueSaturated", "SLMErrorBudgetBurnFast", "SLMErrorBudgetBurnSlow",
    "SLMPerplexityDrift", "SLMOutputLengthDrift", "SLMScrapeTargetMissing", "SLMFaultInjectionEnabled",
}  # fmt: skip


def _rules(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for group in groups for rule in group["rules"]]


def _alerts(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for rule in _rules(groups) if "alert" in rule]


@pytest.fixture(scope="module")
def default_groups() -> list[dict[str, Any]]:
    return render_rule_groups(name="phi", namespace="llm", alerts=None)


def test_every_contract_alert_is_rendered_by_default(default_groups: list[dict[str, Any]]) -> None:
    assert {rule["alert"] for rule in _alerts(default_groups)} == CONTRACT_ALERTS == set(ALERT_NAMES)


def test_every_alert_has_for_severity_summary_description_and_runbook(default_groups: list[dict[str, Any]]) -> None:
    for rule in _alerts(default_groups):
        name = rule["alert"]
        rules.parse_duration(rule["for"])
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert "$labels." in annotations["description"], name
        assert "$value" in annotations["description"], name
        assert annotations["runbook_url"] == f"{rules.DEFAULT_RUNBOOK_BASE_URL}/{name}.md"


def test_every_rule_is_scoped_to_its_deployment(default_groups: list[dict[str, Any]]) -> None:
    for rule in _rules(default_groups):
        assert 'namespace="llm"' in rule["expr"], rule
        # Series not from the server (DCGM, kube-state-metrics) are joined to the deployment's
        # targets or matched by its pod names; everything else carries job="phi" directly.
        assert 'job="phi"' in rule["expr"] or 'pod=~"phi-[a-z0-9]+-[a-z0-9]+"' in rule["expr"], rule


def test_recording_rules_are_named_slm_what_window(default_groups: list[dict[str, Any]]) -> None:
    records = [rule["record"] for rule in _rules(default_groups) if "record" in rule]
    assert len(records) == len(set(records))
    for record in records:
        assert re.fullmatch(r"slm:[a-z0-9_]+:[a-z0-9_]+", record), record


def test_seed_thresholds_are_the_defaults(default_groups: list[dict[str, Any]]) -> None:
    by_name = {rule["alert"]: rule for rule in _alerts(default_groups)}
    assert by_name["SLMHighErrorRate"]["expr"].endswith("> 0.05")
    assert by_name["SLMHighErrorRate"]["for"] == "5m"
    assert by_name["SLMHighErrorRate"]["labels"]["severity"] == "critical"
    assert by_name["SLMSlowResponseTime"]["expr"].endswith("> 2")
    assert by_name["SLMHighGPUUtilization"]["expr"].endswith("> 90")
    assert by_name["SLMHighGPUUtilization"]["for"] == "15m"
    assert 'mountpoint="/data"' in by_name["SLMLowDiskSpace"]["expr"]
    assert by_name["SLMLowDiskSpace"]["expr"].endswith("< 10")


def test_thresholds_for_and_severity_come_from_the_resource() -> None:
    groups = render_rule_groups(
        name="phi",
        namespace="llm",
        alerts={"errorRate": {"threshold": 0.2, "for": "2m", "severity": "warning"}, "runbookBaseURL": "https://rb/x/"},
    )
    (rule,) = [r for r in _alerts(groups) if r["alert"] == "SLMHighErrorRate"]
    assert rule["expr"].endswith("> 0.2")
    assert rule["for"] == "2m"
    assert rule["labels"]["severity"] == "warning"
    assert "threshold 20%" in rule["annotations"]["description"]
    assert rule["annotations"]["runbook_url"] == "https://rb/x/SLMHighErrorRate.md"


def test_disabled_alerts_are_dropped_but_recording_rules_stay(default_groups: list[dict[str, Any]]) -> None:
    disabled = ["SLMHighGPUUtilization", "SLMErrorBudgetBurnSlow", "SLMPerplexityDrift"]
    groups = render_rule_groups(name="phi", namespace="llm", alerts={"disabled": disabled})
    names = {rule["alert"] for rule in _alerts(groups)}
    assert names == CONTRACT_ALERTS - set(disabled)
    records = lambda gs: {r["record"] for r in _rules(gs) if "record" in r}  # noqa: E731
    assert records(groups) == records(default_groups)


def test_burn_rate_windows_follow_the_slo_window() -> None:
    default = rules.burn_rate_windows(merged_alerts(None))
    assert [(b["factor"], b["long"], b["short"]) for b in default] == [
        (14.4, "1h", "5m"), (6, "6h", "30m"), (3, "1d", "2h"), (1, "3d", "6h"),
    ]  # fmt: skip
    week = rules.burn_rate_windows(merged_alerts({"slo": {"window": "7d"}}))
    assert [(b["long"], b["short"]) for b in week] == [
        ("14m", "1m10s"),
        ("1h24m", "7m"),
        ("5h36m", "28m"),
        ("16h48m", "1h24m"),
    ]


def test_burn_rate_thresholds_use_the_error_budget() -> None:
    groups = render_rule_groups(name="phi", namespace="llm", alerts={"slo": {"availabilityPercent": 99.5}})
    fast = [r for r in _alerts(groups) if r["alert"] == "SLMErrorBudgetBurnFast"]
    assert "> (14.4 * 0.005)" in fast[0]["expr"]
    assert {r["labels"]["severity"] for r in fast} == {"critical"}


def test_drift_rules_have_history_guard_and_variance_floor(default_groups: list[dict[str, Any]]) -> None:
    drift = [g for g in default_groups if ".drift-" in g["name"]]
    assert len(drift) == 2
    for group in drift:
        assert group["interval"] == "1m"
        zscore = next(r for r in group["rules"] if "zscore" in r.get("record", ""))
        assert "count_over_time(" in zscore["expr"] and ">= 720" in zscore["expr"]
        assert "clamp_min(" in zscore["expr"]


# Functions, operators and syntax Prometheus 2.x does not know (3.x and its experimental flags):
# the rules must load on both.
PROMETHEUS_3_ONLY = [
    "info(", "double_exponential_smoothing(", "first_over_time(", "ts_of_", "limitk(", "limit_ratio(",
    "sort_by_label", "mad_over_time(", "anchored", "smoothed", "step()", '{"',
]  # fmt: skip


def test_rules_avoid_prometheus_3_only_syntax() -> None:
    for alerts in (None, {"slo": {"window": "7d"}}):
        for rule in _rules(render_rule_groups(name="phi", namespace="llm", alerts=alerts)):
            for token in PROMETHEUS_3_ONLY:
                assert token not in rule["expr"], (token, rule["expr"])
            # Duration arithmetic in range selectors ([5m+1m]) is 3.x experimental.
            assert not re.search(r"\[[^\]]*[+*/]", rule["expr"]), rule["expr"]


def test_every_defaults_key_is_used_by_the_rules() -> None:
    used = {spec["config"] for spec in rules.rules_data()["alerts"]} | {
        spec["config"] for spec in rules.rules_data()["drift"]
    }
    assert used | {"slo", "disabled", "runbookBaseURL"} == set(ALERT_DEFAULTS)


def test_durations_round_trip() -> None:
    for text, seconds in (("5m", 300), ("1h30m", 5400), ("3d", 259200), ("0s", 0), ("0", 0), ("70s", 70)):
        assert rules.parse_duration(text) == seconds
        assert rules.parse_duration(rules.format_duration(seconds)) == seconds
    with pytest.raises(ValueError):
        rules.parse_duration("5 minutes")
