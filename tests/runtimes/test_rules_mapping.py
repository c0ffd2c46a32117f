"""The shared recording rules read, for each runtime, only that runtime's mapped native series (which
tests/runtimes/test_metric_names.py checks against the runtime's own code), and each runtime gets exactly
the alerts it can feed; the others are named with the runtime's reason."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from slm_devtools.tools import REPO_ROOT
from slm_operator.monitoring import rules
from slm_operator.monitoring.metric_names import external_metric_names, metric_names, runtime_metric_names
from slm_operator.runtimes import render_runtime

MAPPING: dict[str, Any] = yaml.safe_load(
    (REPO_ROOT / "operator/slm_operator/monitoring/data/runtime_metrics.yaml").read_text()
)
THIRD_PARTY = ["vllm", "sglang", "tgi", "llamacpp"]
# What every runtime group may read besides its own series: DCGM's GPU series joined to the pod's target.
NODE_SERIES = external_metric_names()["dcgm_exporter"] | {"up"}

# Written out by hand from each runtime's gaps (docs/reference/runtimes.md), never read from the rules.
ALWAYS_ = {"SLMHighGPUUtilization", "SLMHighGPUMemory", "SLMGPUXidErrors", "SLMTargetDown", "SLMPodCrashLooping",
          "SLMPodNotReady", "SLMScrapeTargetMissing"}  # fmt: skip
BUILTIN_ONLY = {"SLMQueueSaturated", "SLMLowDiskSpace", "SLMGPUMetricsAbsent"}
# Fed by the built-in server itself, and for the other runtimes by the monitoring sidecar in their pods.
SIDECAR = {"SLMFaultInjectionEnabled", "SLMPerplexityDrift"}
TRAFFIC = {"SLMHighErrorRate", "SLMSlowResponseTime", "SLMErrorBudgetBurnFast", "SLMErrorBudgetBurnSlow",
           "SLMOutputLengthDrift"}  # fmt: skip
ALWAYS = ALWAYS_ | SIDECAR
RENDERED = {
    "builtin": ALWAYS | BUILTIN_ONLY | TRAFFIC | {"SLMHighTimeToFirstToken"},
    "vllm": ALWAYS | TRAFFIC | {"SLMHighTimeToFirstToken", "SLMKVCacheSaturated", "SLMRequestsPreempted"},
    "sglang": ALWAYS | TRAFFIC | {"SLMHighTimeToFirstToken", "SLMKVCacheSaturated", "SLMRequestsPreempted"},
    "tgi": ALWAYS | TRAFFIC,
    "llamacpp": ALWAYS,
}


def groups_by_runtime() -> dict[str, list[dict[str, Any]]]:
    charted = yaml.safe_load((REPO_ROOT / "charts/slm-monitoring/rules/recording-rules.yaml").read_text())["groups"]
    return {group["name"].removeprefix(rules.SHARED_GROUP_PREFIX): group["rules"] for group in charted}


@pytest.mark.parametrize("runtime", THIRD_PARTY)
def test_each_runtime_group_reads_only_its_own_mapped_series(runtime: str) -> None:
    own = runtime_metric_names()[runtime]
    read = set().union(*(metric_names(rule["expr"]) for rule in groups_by_runtime()[runtime]))
    assert read - own - NODE_SERIES == set()
    # …and every signal the mapping has, apart from queue time (no alert or panel reads it), is read.
    mapped = {row["name"] for signal, row in MAPPING["runtimes"][runtime]["metrics"].items()
              if "name" in row and signal != "queue_time"}  # fmt: skip
    assert {name for name in mapped if not any(n.startswith(name) for n in read)} == set()


def test_no_group_reads_another_runtimes_series() -> None:
    names = runtime_metric_names()
    for runtime, group in groups_by_runtime().items():
        read = set().union(*(metric_names(rule["expr"]) for rule in group))
        for other in THIRD_PARTY:
            if other != runtime:
                assert not read & names[other], (runtime, other)


def test_each_group_selects_the_container_the_runtime_renders() -> None:
    """The column's `target` names the container runtimes.py renders, so Prometheus' `container` label matches."""
    data = rules.rules_data()["runtimes"]
    for runtime in THIRD_PARTY:
        container = render_runtime(runtime, model="/models/m.gguf" if runtime == "llamacpp" else "org/m",
                                   served_model_name="m", port=8000)["container"]  # fmt: skip
        assert data[runtime]["target"] == f'container="{container}"'
        assert container == runtime


@pytest.mark.parametrize("runtime", ["builtin", *THIRD_PARTY])
def test_each_runtime_gets_the_alerts_it_can_feed(runtime: str) -> None:
    groups = rules.render_rule_groups(name="phi", namespace="llm", alerts=None, runtime=runtime)
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    assert alerts == RENDERED[runtime]
    every = set(rules.ALERT_NAMES) | set(rules.runtime_alert_names())
    unrendered = rules.unrendered_alerts(runtime)
    assert set(unrendered) == every - RENDERED[runtime]
    for alert, lacking in unrendered.items():
        for entry in lacking:
            assert entry["reason"] and entry["series"].startswith("slm:"), (alert, entry)
    # Nothing is recorded for a deployment whose drift mean the runtime cannot compute.
    names = {group["name"] for group in groups}
    assert "slm-phi.drift-perplexity" in names  # the sidecar measures it where the runtime does not
    assert ("slm-phi.drift-output_length" in names) == (runtime != "llamacpp")


def test_the_reasons_are_the_runtimes_own() -> None:
    llama = rules.unrendered_alerts("llamacpp")
    assert llama["SLMHighErrorRate"][0]["reason"].startswith("llama-server counts no")
    assert llama["SLMHighTimeToFirstToken"] == [{
        "series": "slm:time_to_first_token_seconds_p95:rate5m", "signal": "ttft",
        "reason": "llama-server has no time-to-first-token metric (its prompt processing time is a total over "
                  "requests)",
    }]  # fmt: skip
    tgi = rules.unrendered_alerts("tgi")
    assert "TGI records no time to first token" in tgi["SLMHighTimeToFirstToken"][0]["reason"]
    builtin = rules.unrendered_alerts("builtin")
    assert builtin["SLMRequestsPreempted"][0]["reason"] == "the built-in server never preempts a running request"


def test_an_unknown_runtime_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown runtime 'triton'"):
        rules.render_rule_groups(name="phi", namespace="llm", alerts=None, runtime="triton")


def test_the_reference_page_lists_the_alerts_each_runtime_lacks() -> None:
    page = (REPO_ROOT / "docs/reference/runtimes.md").read_text()
    section = page.split("**Alerts not rendered per runtime.**", 1)[1].split("\n\n", 2)[1]
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in section.splitlines()[2:]}
    titles = {"builtin": "built-in", "vllm": "vLLM", "sglang": "SGLang", "tgi": "TGI", "llamacpp": "llama.cpp"}
    for runtime in ("builtin", "vllm", "sglang", "llamacpp"):
        cell = rows[titles[runtime]]
        named = {word.strip(" ,") for word in cell.split() if word.startswith("SLM")}
        every = set(rules.ALERT_NAMES) | set(rules.runtime_alert_names())
        expected = RENDERED[runtime] if cell.strip().startswith("all but") else every - RENDERED[runtime]
        assert named == expected, runtime
