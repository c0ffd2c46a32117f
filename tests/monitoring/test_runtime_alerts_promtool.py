"""SLMKVCacheSaturated and SLMRequestsPreempted with the thresholds an SRE sets in the resource
(`spec.monitoring.alerts.kvCacheSaturation`, `.requestPreemptions`), through `promtool test rules`.

The chart's shared recording rules (as Helm ships them) and one deployment's PrometheusRule rendered for vLLM
or SGLang, fed with the runtime's own series (names and labels of data/runtime_metrics.yaml, target labels of
the runtime's container). Four cases per alert, as kubernetes-mixin and govuk-helm-charts write them: silent
just before `for` elapses, firing after it with its exact labels and annotations, a short burst that must
not fire, and recovery. Every expected value is written out and worked out by hand below, never read from
the rules; the generated cases with the defaults are in runtime_promtool_cases.py.

Timing: the shared groups are evaluated first at each step (`group_eval_order`; promtool's own order is
random), so an alert sees what was recorded at the same step.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools.tools import tool
from slm_operator.monitoring.rules import render_rule_groups

from .test_rules_promtool import with_shared, write_rule_files

NAME, NAMESPACE, POD = "phi", "llm", "phi-6d9f8b7c5-x2k4q"
ALERTS = {
    "kvCacheSaturation": {"thresholdPercent": 75, "for": "3m", "severity": "critical"},
    "requestPreemptions": {"thresholdPerSecond": 1, "for": "2m", "severity": "info"},
    "runbookBaseURL": "https://runbooks.example.com/slm/",
}
# Labels the Prometheus Operator gives a series scraped from the runtime's container (port `runtime`, 8080).
TARGET = f'namespace="llm",job="phi",service="phi",pod="{POD}",instance="10.0.1.5:8080"'
# The runtime's own series: one for vLLM; SGLang's scheduler series once per tensor-parallel rank, each the
# pod's whole figure (the recording rules take the highest rank).
KV_CACHE = {
    "vllm": [f'vllm:kv_cache_usage_perc{{{TARGET},container="vllm",model_name="tiny",engine="0"}}'],
    "sglang": [f'sglang:token_usage{{{TARGET},container="sglang",model_name="tiny",engine_type="unified",'
               f'tp_rank="{rank}",pp_rank="0",moe_ep_rank="0"}}' for rank in ("0", "1")],
}
PREEMPTIONS = {
    "vllm": [f'vllm:num_preemptions_total{{{TARGET},container="vllm",model_name="tiny",engine="0"}}'],
    "sglang": [f'sglang:num_retracted_requests_total{{{TARGET},container="sglang",model_name="tiny",'
               f'engine_type="unified",tp_rank="{rank}",pp_rank="0",moe_ep_rank="0"}}' for rank in ("0", "1")],
}


def kv_firing(percent: str) -> list[dict[str, Any]]:
    return [{
        "exp_labels": {"namespace": "llm", "job": "phi", "pod": POD, "instance": "10.0.1.5:8080",
                       "severity": "critical"},
        "exp_annotations": {
            "summary": f"llm/{POD}: KV cache {percent}% full",
            "description": f"The KV cache of pod llm/{POD} (SLMDeployment phi) is {percent}% full (threshold 75%); "
                           "new requests wait, and running ones are preempted and recomputed.",
            "runbook_url": "https://runbooks.example.com/slm/SLMKVCacheSaturated.md",
        },
    }]


def preempted_firing(per_second: str) -> list[dict[str, Any]]:
    return [{
        "exp_labels": {"namespace": "llm", "job": "phi", "severity": "info"},
        "exp_annotations": {
            "summary": f"llm/phi: {per_second} requests preempted per second",
            "description": f"SLMDeployment llm/phi preempted {per_second} requests per second over the last 5m "
                           "(threshold 1/s): the KV cache is too small for the load, and each preempted request "
                           "is computed again.",
            "runbook_url": "https://runbooks.example.com/slm/SLMRequestsPreempted.md",
        },
    }]


def check(alert: str, minute: int, firing: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": firing or []}


def kv_cases(runtime: str) -> list[dict[str, Any]]:
    # One sample a minute. The shared rule records 100 x the highest rank's fraction; the alert reads `> 75`.
    # SGLang's second rank reports less: the fullest rank counts.
    other_rank = "0.6x29"
    def series(values: str) -> list[dict[str, str]]:
        return [{"series": name, "values": values if index == 0 else other_rank}
                for index, name in enumerate(KV_CACHE[runtime])]

    alert = "SLMKVCacheSaturated"
    return [
        {
            # 50% for minutes 0-9, 80% for 10-19, 50% again from 20: above 75 from 10m, `for: 3m` -> fires at
            # 13m (not at 12m) with the recorded 80; resolved once the fraction is back at 20m.
            "name": f"[{runtime}] {alert} fires when the KV cache stays above the resource's 75% for 3m",
            "interval": "1m",
            "input_series": series("0.5x9 0.8x9 0.5x9"),
            "alert_rule_test": [check(alert, 9), check(alert, 12), check(alert, 13, kv_firing("80")),
                                check(alert, 19, kv_firing("80")), check(alert, 20)],
        },
        {
            # 90% for two minutes (10-11): shorter than `for`, never fires.
            "name": f"[{runtime}] {alert} stays silent through a 2-minute spike",
            "interval": "1m",
            "input_series": series("0.5x9 0.9x1 0.5x17"),
            "alert_rule_test": [check(alert, 11), check(alert, 12), check(alert, 14)],
        },
        {
            # Exactly at the threshold is not above it.
            "name": f"[{runtime}] {alert} stays silent at exactly 75%",
            "interval": "1m",
            "input_series": series("0.75x29"),
            "alert_rule_test": [check(alert, 10), check(alert, 20)],
        },
    ]


def preemption_cases(runtime: str) -> list[dict[str, Any]]:
    # A counter starting high, flat for minutes 0-10, then +120 a minute (2/s). rate(...[5m]) at minute t reads
    # the samples of minutes t-4..t, extrapolated to 5 minutes (the first sample is one interval in):
    #   t=12: 1000,1000,1000,1120,1240 -> 240 x 5/4 = 300 per 5m = 1.0/s: not above 1;
    #   t=13: +360 x 5/4 = 1.5/s: pending from 13m; `for: 2m` -> silent at 14m, firing at 15m;
    #   from t=15 while it ramps: 480 x 5/4 = 600 per 5m = 2.00/s.
    # Flat again from minute 31: the rate is back to 0 at 35m.
    def series(values: str) -> list[dict[str, str]]:
        return [{"series": name, "values": values} for name in PREEMPTIONS[runtime]]

    alert = "SLMRequestsPreempted"
    return [
        {
            "name": f"[{runtime}] {alert} fires when preemptions stay above the resource's 1/s for 2m",
            "interval": "1m",
            "input_series": series("1000x10 1120+120x19 3400x20"),
            "alert_rule_test": [check(alert, 12), check(alert, 14), check(alert, 15, preempted_firing("2.00")),
                                check(alert, 25, preempted_firing("2.00")), check(alert, 35)],
        },
        {
            # Three minutes of preemptions (11-13): the rate is 1.5/s at 13m and 14m, 1.0/s at 15m: above the
            # threshold for less than `for`, never fires.
            "name": f"[{runtime}] {alert} stays silent through a 3-minute burst",
            "interval": "1m",
            "input_series": series("1000x10 1120+120x2 1360x20"),
            "alert_rule_test": [check(alert, 14), check(alert, 15), check(alert, 16), check(alert, 20)],
        },
    ]


def rule_files(directory: Path, alerts: dict[str, Any] | None, runtime: str) -> dict[str, str]:
    """{group name: file}, the shared groups first."""
    groups = with_shared(render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=alerts, runtime=runtime))
    return write_rule_files(directory, [g for g in groups if ".drift-" not in g["name"]])


def promtool_test(directory: Path, files: dict[str, str], cases: list[dict[str, Any]],
                  ) -> subprocess.CompletedProcess[str]:
    path = directory / "test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": list(files.values()), "evaluation_interval": "1m",
                                    "group_eval_order": list(files), "tests": cases}, sort_keys=False, width=1000))
    return subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("runtime", ["vllm", "sglang"])
def test_kv_cache_and_preemption_alerts_follow_the_resource(tmp_path: Path, runtime: str) -> None:
    files = rule_files(tmp_path, ALERTS, runtime)
    result = promtool_test(tmp_path, files, [*kv_cases(runtime), *preemption_cases(runtime)])
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


def test_the_cases_fail_on_rules_with_the_default_threshold(tmp_path: Path) -> None:
    """Not vacuous: rules rendered with the defaults (90%, 10m) do not pass the resource's cases."""
    result = promtool_test(tmp_path, rule_files(tmp_path, None, "vllm"), kv_cases("vllm")[:1])
    assert result.returncode != 0
    assert "SLMKVCacheSaturated fires when the KV cache stays above" in result.stdout + result.stderr
