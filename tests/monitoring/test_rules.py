"""Unit tests of the rule layers (structure; behaviour is in test_rules_promtool.py): the shared recording
rules, a table with one column per runtime, and the per-deployment groups that read only what they record."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from slm_operator import render
from slm_operator.monitoring import rules
from slm_operator.monitoring.defaults import ALERT_DEFAULTS, SEVERITIES, merged_alerts
from slm_operator.monitoring.metric_names import metric_names
from slm_operator.monitoring.rules import ALERT_NAMES, render_rule_groups, shared_rule_groups
from slm_operator.spec import Parent, parse_spec

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
    shared = [rule["record"] for group in shared_rule_groups() for rule in group["rules"]]
    records = [rule["record"] for rule in _rules(default_groups) if "record" in rule]
    for group in shared_rule_groups():
        names = [rule["record"] for rule in group["rules"]]
        assert len(names) == len(set(names)), group["name"]
    assert len(records) == len(set(records)) and not set(records) & set(shared)
    for record in shared + records:
        assert re.fullmatch(r"slm:[a-z0-9_]+:[a-z0-9_]+", record), record


# ---- the two layers ---------------------------------------------------------------------------------------

# The only series a deployment's alerts read that no shared rule records: Prometheus' own `up` of the
# deployment's targets and kube-state-metrics' series of its Deployment and pods, which the shared layer
# cannot tell apart from any other workload's (only the deployment knows its names).
NOT_RECORDED = {
    "SLMTargetDown": {"up"},
    "SLMScrapeTargetMissing": {"up", "kube_deployment_status_replicas_ready"},
    "SLMPodCrashLooping": {"kube_pod_container_status_waiting_reason"},
    "SLMPodNotReady": {"kube_pod_status_ready"},
}


@pytest.mark.parametrize("alerts", [None, {"slo": {"window": "7d"}, "errorRate": {"window": "2m"}}],
                         ids=["defaults", "other-windows"])  # fmt: skip
def test_deployment_rules_read_only_what_the_shared_layer_records(alerts: dict[str, Any] | None) -> None:
    shared = {rule["record"] for group in shared_rule_groups() for rule in group["rules"]}
    groups = render_rule_groups(name="phi", namespace="llm", alerts=alerts)
    own = {rule["record"] for rule in _rules(groups) if "record" in rule}
    for rule in _rules(groups):
        name = rule.get("alert") or rule["record"]
        read = metric_names(rule["expr"])
        raw = {metric for metric in read if not metric.startswith("slm:")}
        assert raw == NOT_RECORDED.get(name, set()), name
        assert read - raw <= shared | own, (name, sorted(read - raw - shared - own))


def test_the_only_recording_rules_left_per_deployment_are_the_drift_rules(default_groups: list[dict[str, Any]]) -> None:
    """Everything else is recorded once for the whole cluster: 8 drift series instead of ~30 per deployment."""
    assert [group["name"] for group in default_groups] == [
        "slm-phi.alerts", "slm-phi.drift-perplexity", "slm-phi.drift-output_length",
    ]  # fmt: skip
    assert not [rule for rule in default_groups[0]["rules"] if "record" in rule]
    records = [rule["record"] for rule in _rules(default_groups) if "record" in rule]
    assert len(records) == 8
    assert all(".drift-" in g["name"] for g in default_groups for r in g["rules"] if "record" in r)


def test_long_slo_windows_are_never_computed_from_raw_series(default_groups: list[dict[str, Any]]) -> None:
    """No rule of either layer takes a window longer than 5m over a runtime's own series."""
    exprs = [rule["expr"] for group in [*shared_rule_groups(), *default_groups] for rule in group["rules"]]
    for expr in exprs:
        for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{[^{}]*\}\[([0-9a-z]+)\]", expr):
            series, window = match.groups()
            if rules.parse_duration(window) > 300:
                assert series.startswith("slm:"), expr
    burn = next(r for r in _rules(default_groups) if r.get("labels", {}).get("long_window") == "3d")
    assert "slm:requests:pod_total" in burn["expr"] and "[3d]" in burn["expr"]


def test_shared_rules_name_no_deployment_and_keep_namespace_and_job() -> None:
    for group in shared_rule_groups():
        for rule in group["rules"]:
            assert 'job="' not in rule["expr"] and 'namespace="' not in rule["expr"], rule
            # Every aggregation keeps the deployment apart: by (namespace, job, ...), or none at all.
            for grouping in re.findall(r"\b(?:max|sum|min|avg) by \(([^)]*)\)", rule["expr"]):
                labels = {label.strip() for label in grouping.split(",")}
                assert {"namespace", "job"} <= labels or labels == {"namespace", "pod", "job"}, rule


def test_one_shared_group_per_runtime_with_every_row_the_runtime_has() -> None:
    data = rules.rules_data()
    assert list(data["runtimes"]) == list(rules.runtime_names()) == ["builtin", "vllm", "sglang", "tgi", "llamacpp"]
    groups = shared_rule_groups()
    assert [group["name"] for group in groups] == [f"slm-shared.runtime-{r}" for r in rules.runtime_names()] + [
        "slm-shared.sidecar"]
    # The built-in server records every row but the KV cache's and the preemptions' (it has neither).
    builtin = [rule["record"] for rule in groups[0]["rules"]]
    assert builtin == [r for r in rules.shared_records() if r not in {"slm:kv_cache_usage:percent",
                                                                      "slm:preemptions:rate5m"}]


def test_the_sidecar_group_records_quality_signals_once_for_every_third_party_runtime() -> None:
    """Perplexity and fault injection come from the monitoring sidecar for vLLM, SGLang, TGI and llama.cpp:
    recorded once from the sidecar container, and the drift and fault-injection alerts render for them."""
    groups = {group["name"]: group["rules"] for group in shared_rule_groups()}
    sidecar = {rule["record"]: rule["expr"] for rule in groups["slm-shared.sidecar"]}
    assert set(sidecar) == {"slm:fault_injection_enabled:max", "slm:request_perplexity_sum:pod_total",
                            "slm:request_perplexity_count:pod_total"}
    assert all('container="slm-sidecar"' in expr for expr in sidecar.values())
    for runtime in ("vllm", "sglang", "tgi", "llamacpp"):
        assert set(sidecar) <= rules.runtime_records(runtime)
        assert not set(sidecar) & {rule["record"] for rule in groups[f"slm-shared.runtime-{runtime}"]}
        unrendered = rules.unrendered_alerts(runtime)
        assert "SLMPerplexityDrift" not in unrendered and "SLMFaultInjectionEnabled" not in unrendered
    # llama.cpp counts no finished requests: its output-length drift still cannot be rendered.
    assert "SLMOutputLengthDrift" in rules.unrendered_alerts("llamacpp")


def test_a_sidecar_cell_beside_a_cell_of_a_runtime_it_serves_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = rules.rules_data()
    row = next(r for r in data["recording"] if r["record"] == "slm:request_perplexity_sum:pod_total")
    row["vllm"] = "sum by (namespace, job) (vllm:nosuch{${target}})"
    monkeypatch.setattr(rules, "_load_rules_data", lambda: data)
    with pytest.raises(ValueError, match="twice"):
        shared_rule_groups()


def test_a_new_runtime_is_one_more_column_of_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime added to the table gets its own group: its cells, the `any` cells, nothing of another's."""
    data = rules.rules_data()
    data["runtimes"]["mlc"] = {"title": "MLC LLM", "source": "python/mlc_llm/serve/server.py",
                               "target": 'container="mlc"', "traffic": 'container="mlc"'}  # fmt: skip
    row = next(r for r in data["recording"] if r["record"] == "slm:requests:rate5m")
    row["mlc"] = 'sum by (namespace, job) (rate(mlc:requests_processing{${target}}[5m]))'
    monkeypatch.setattr(rules, "_load_rules_data", lambda: data)
    groups = {group["name"]: group["rules"] for group in shared_rule_groups()}
    llama = {rule["record"]: rule["expr"] for rule in groups["slm-shared.runtime-mlc"]}
    assert llama["slm:requests:rate5m"] == (
        'sum by (namespace, job) (rate(mlc:requests_processing{container="mlc"}[5m]))'
    )
    anys = {r["record"] for r in data["recording"] if "any" in r}
    assert set(llama) == {"slm:requests:rate5m"} | anys
    assert 'container="mlc"' in llama["slm:gpu_xid_error:max5m"]
    assert "nvidia_gpu" not in llama["slm:gpu_utilization:percent"]
    assert all('container="mlc"' not in rule["expr"] for rule in groups["slm-shared.runtime-builtin"])

    row["nosuch"] = "nosuch:num_requests_running"
    with pytest.raises(ValueError, match="unknown runtimes"):
        shared_rule_groups()


def test_the_builtin_column_selects_the_container_the_operator_renders() -> None:
    """The builtin column's `target` matcher names the serving container of the rendered Deployment."""
    parent = Parent("phi", "llm", "u-1")
    spec = {"model": {"name": "sshleifer/tiny-gpt2"}, "runtime": "builtin"}
    children = render.desired_children(parent, parse_spec(spec), render.RenderContext(server_image="img"))
    deployment = next(child for child in children if child["kind"] == "Deployment")
    (serving,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                  if any(port.get("name") == "http" for port in c.get("ports", []))]  # fmt: skip
    assert rules.rules_data()["runtimes"]["builtin"]["target"] == f'container="{serving["name"]}"'


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
        for rule in _rules([*shared_rule_groups(), *render_rule_groups(name="phi", namespace="llm", alerts=alerts)]):
            for token in PROMETHEUS_3_ONLY:
                assert token not in rule["expr"], (token, rule["expr"])
            # Duration arithmetic in range selectors ([5m+1m]) is 3.x experimental.
            assert not re.search(r"\[[^\]]*[+*/]", rule["expr"]), rule["expr"]


def test_every_defaults_key_is_used_by_the_rules() -> None:
    used = {spec["config"] for spec in rules.rules_data()["alerts"]} | {
        spec["config"] for spec in rules.rules_data()["drift"]
    } | {spec["config"] for spec in rules.rules_data()["runtime_alerts"]}
    assert used | {"slo", "disabled", "runbookBaseURL"} == set(ALERT_DEFAULTS)


def test_durations_round_trip() -> None:
    for text, seconds in (("5m", 300), ("1h30m", 5400), ("3d", 259200), ("0s", 0), ("0", 0), ("70s", 70)):
        assert rules.parse_duration(text) == seconds
        assert rules.parse_duration(rules.format_duration(seconds)) == seconds
    with pytest.raises(ValueError):
        rules.parse_duration("5 minutes")
