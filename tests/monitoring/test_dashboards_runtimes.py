"""One dashboard JSON and one alert set for all five runtimes, proven per runtime.

For each runtime, a deployment's pod is written out as Prometheus would scrape it: the runtime's own series
(third-party runtimes: names, types, labels and buckets from data/runtime_metrics.yaml, which
tests/runtimes/test_metric_names.py checks against each runtime's code; the built-in server: its own
metrics), the monitoring sidecar's `slm_*` series in front of a third-party runtime, DCGM's GPU series and
kube-state-metrics'. `promtool test rules` feeds them through the chart's shared recording rules and the
deployment's PrometheusRule rendered for that runtime, then evaluates every panel query of the deployment
dashboard and of the fleet dashboard, as Grafana sends it.

Expected, written out here and never read from the code under test: which queries stay empty for which
runtime (the signals docs/reference/runtimes.md lists as missing), and the values a user reads on the main
panels, which must be the same for every runtime that has the signal. A panel that stays empty for a runtime
must say that the runtime does not expose it (Grafana `noValue`), and docs/reference/dashboards.md must say so.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from slm_devtools.tools import REPO_ROOT, tool
from slm_operator.monitoring.dashboards import BUILTIN_ENGINE_SERIES, render_dashboard, render_fleet_dashboard
from slm_operator.monitoring.metric_names import metric_names, runtime_metric_names
from slm_operator.monitoring.rules import ALERT_NAMES, render_rule_groups, runtime_alert_names, unrendered_alerts
from slm_server.metrics import (
    ITL_BUCKETS,
    PERPLEXITY_BUCKETS,
    REQUEST_DURATION_BUCKETS,
    TOKEN_COUNT_BUCKETS,
    TOKENS_PER_SECOND_BUCKETS,
    TTFT_BUCKETS,
)
from slm_sidecar.app import create_app
from slm_sidecar.settings import SidecarSettings

from . import promtool_cases as pc
from . import runtime_promtool_cases as rc
from .test_rules_promtool import with_shared, write_rule_files

RUNTIMES = ["builtin", "vllm", "sglang", "tgi", "llamacpp"]
NAME, NAMESPACE, MODEL = pc.NAME, pc.NAMESPACE, pc.MODEL
SIDECAR = "slm-sidecar"  # the sidecar's container (docs/sidecar.md)
# Drift over 15m against 1h of history, so the z-scores have their history guard filled within the run.
ALERTS = {
    "perplexityDrift": {"window": "15m", "baselineWindow": "1h"},
    "outputLengthDrift": {"window": "15m", "baselineWindow": "1h"},
}
MINUTES = 70  # input series length; queries are evaluated at EVAL
EVAL = "65m"

# ---- what the pod exposes, per minute ----------------------------------------------------------------------
REQUESTS = 1000.0  # finished requests per minute, of which
FAILED = 10.0  # failed on the server's side
PROMPT_TOKENS = 1200.0
GENERATED_TOKENS = 3000.0
RUNNING, WAITING = 3.0, 2.0
E2E_P95, TTFT_P95, ITL_P95 = 0.9, 0.3, 0.032  # seconds; each strictly inside a bucket of every runtime
KV_USAGE = 0.4  # share of the KV cache in use
PREEMPTIONS = 3.0
GPU_UTIL = 95.0  # above SLMHighGPUUtilization's 90 % for longer than its 15m: the fleet's alert table fills

# ---- expected: the queries each runtime cannot answer (docs/reference/runtimes.md), by (panel, legend) ------
D, F = "deployment", "fleet"
NOT_FROM_THE_SIDECAR = {  # the built-in engine's own series, which no other runtime has
    (D, "Tokens per second", "prompt, from the prefix cache (not fed)"),
    (D, "In-flight and queued requests", "concurrency limit"),
    (D, "In-flight and queued requests", "queue limit"),
    (D, "In-flight and queued requests", "mean batch (generations per forward pass)"),
    (D, "KV cache memory", "running generations"),
    (D, "KV cache memory", "of which padding"),
    (D, "KV cache memory", "prefix cache"),
    (D, "KV cache memory", "prefix cache budget"),
    (D, "Model load time", "load"),
}
BUILTIN_ONLY = NOT_FROM_THE_SIDECAR | {
    (D, "Response time p50 / p95", "p95 {{endpoint}}"),  # no route label on the runtimes' latency
    (D, "Response time p50 / p95", "p50 {{endpoint}}"),
    (D, "Queue utilisation", "{{model}}"),
    (F, "Queue utilisation", "{{namespace}}/{{job}}"),
    (D, "Free disk space", "{{pod}} {{mountpoint}}"),
}
NO_KV_CACHE_SHARE = {(D, "KV cache usage", "{{pod}}"), (D, "Preemptions", "preempted")}
NO_TTFT = {
    (D, "Time to first token", "p95 (alert)"),
    (D, "Time to first token", "p50"),
    (F, "Time to first token p95", "{{namespace}}/{{job}}"),
}
NO_REQUESTS = {
    (D, "Request rate", "{{endpoint}}"),
    (D, "Error rate", "{{endpoint}}"),
    (D, "Error rate", "all endpoints, 5m (alert)"),
    (D, "Response time p50 / p95", "p95 (alert)"),
    (D, "Response time p50 / p95", "p50"),
    (D, "Error budget burn rate", "1h window"),
    (D, "Error budget burn rate", "6h window"),
    (D, "Error budget burn rate", "1d window"),
    (D, "Inter-token latency", "p95"),
    (D, "Inter-token latency", "p50"),
    (D, "Output length", "mean (15m)"),
    (D, "Drift z-scores (PromQL baseline)", "output length"),
    (F, "Request rate", "{{namespace}}/{{job}}"),
    (F, "Error ratio", "{{namespace}}/{{job}}"),
    (F, "Response time p95", "{{namespace}}/{{job}}"),
}
EMPTY = {
    "builtin": NO_KV_CACHE_SHARE,
    "vllm": BUILTIN_ONLY,
    "sglang": BUILTIN_ONLY,
    "tgi": BUILTIN_ONLY | NO_KV_CACHE_SHARE | NO_TTFT,
    "llamacpp": BUILTIN_ONLY | NO_KV_CACHE_SHARE | NO_TTFT | NO_REQUESTS,
}
# Panels no query of which a runtime answers: they must say so. (dashboard, title): runtimes.
SILENT = {
    (D, "Request rate"): {"llamacpp"},
    (D, "Error rate"): {"llamacpp"},
    (D, "Response time p50 / p95"): {"llamacpp"},
    (D, "Error budget burn rate"): {"llamacpp"},
    (D, "Time to first token"): {"tgi", "llamacpp"},
    (D, "Queue utilisation"): {"vllm", "sglang", "tgi", "llamacpp"},
    (D, "KV cache usage"): {"builtin", "tgi", "llamacpp"},
    (D, "Preemptions"): {"builtin", "tgi", "llamacpp"},
    (D, "KV cache memory"): {"vllm", "sglang", "tgi", "llamacpp"},
    (D, "Free disk space"): {"vllm", "sglang", "tgi", "llamacpp"},
    (D, "Model load time"): {"vllm", "sglang", "tgi", "llamacpp"},
    (F, "Request rate"): {"llamacpp"},
    (F, "Error ratio"): {"llamacpp"},
    (F, "Response time p95"): {"llamacpp"},
    (F, "Time to first token p95"): {"tgi", "llamacpp"},
    (F, "Queue utilisation"): {"vllm", "sglang", "tgi", "llamacpp"},
}
TITLES = {"builtin": "built-in server", "vllm": "vLLM", "sglang": "SGLang", "tgi": "TGI", "llamacpp": "llama.cpp"}

# What a user reads on the main panels, the same for every runtime that has the signal: (panel, legend,
# aggregation over the query's series) -> (value x 1000, runtimes).
ENGINE_RUNTIMES = {"builtin", "vllm", "sglang", "tgi"}
VALUES: dict[tuple[str, str, str], tuple[int, set[str]]] = {
    ("Request rate", "{{endpoint}}", "sum"): (16667, ENGINE_RUNTIMES),  # 1000 per minute
    ("Error rate", "{{endpoint}}", "max"): (10, ENGINE_RUNTIMES),  # 1 %
    ("Error rate", "all endpoints, 5m (alert)", "max"): (10, ENGINE_RUNTIMES),
    ("Response time p50 / p95", "p95 (alert)", "max"): (900, ENGINE_RUNTIMES),
    ("Time to first token", "p95 (alert)", "max"): (300, {"builtin", "vllm", "sglang"}),
    ("Inter-token latency", "p95", "max"): (32, ENGINE_RUNTIMES),
    ("Inter-token latency", "mean", "max"): (32, set(RUNTIMES)),
    ("Tokens per second", "generated (all requests)", "sum"): (50000, set(RUNTIMES)),
    ("Tokens per second", "prompt (all requests)", "sum"): (20000, set(RUNTIMES)),
    ("In-flight and queued requests", "running", "sum"): (3000, set(RUNTIMES)),
    ("In-flight and queued requests", "waiting", "sum"): (2000, set(RUNTIMES)),
    ("KV cache usage", "{{pod}}", "max"): (40000, {"vllm", "sglang"}),
    ("Preemptions", "preempted", "sum"): (50, {"vllm", "sglang"}),
    ("GPU utilisation", "{{pod}} GPU {{gpu}}", "max"): (95000, set(RUNTIMES)),
}


# ---- the pod's series ---------------------------------------------------------------------------------------


def counter(labels: Mapping[str, str], per_minute: float) -> pc.Metric:
    return pc.Metric(dict(labels), lambda _: per_minute, counter=True)


def gauge(labels: Mapping[str, str], value: float) -> pc.Metric:
    return pc.Metric(dict(labels), lambda _: value)


def histogram(
    labels: Mapping[str, str],
    bounds: Iterable[float],
    p95: float,
    per_minute: float = REQUESTS,
    mean: float | None = None,
    parts: tuple[str, ...] = ("_bucket", "_sum", "_count"),
) -> list[pc.Metric]:
    """A histogram's series whose 5m p95 (histogram_quantile) is `p95`: 95 % of the observations in the first
    bucket, the rest placed in the bucket holding `p95` so that interpolation lands on it."""
    bounds = [float(b) for b in bounds]
    index = next(i for i, upper in enumerate(bounds) if p95 < upper)
    lower = bounds[index - 1]
    assert index > 0 and p95 > lower, (labels, p95)
    share = 0.05 / (1 - (p95 - lower) / (bounds[index] - lower))
    name = labels["__name__"]
    metrics = []
    if "_bucket" in parts:
        for i, upper in enumerate([*bounds, math.inf]):
            cumulative = (1 - share) + (share if i >= index else 0.0)
            le = "+Inf" if upper == math.inf else pc._num(upper)
            metrics.append(counter({**labels, "__name__": f"{name}_bucket", "le": le}, per_minute * cumulative))
    if "_sum" in parts:
        metrics.append(counter({**labels, "__name__": f"{name}_sum"}, per_minute * (p95 if mean is None else mean)))
    if "_count" in parts:
        metrics.append(counter({**labels, "__name__": f"{name}_count"}, per_minute))
    return metrics


def dcgm_and_kube(container: str) -> list[pc.Metric]:
    """What the node reports about the pod's GPU (dcgm-exporter, pod mapping on) and kube-state-metrics."""
    gpu = {**pc.DCGM, "container": container}
    return [
        gauge({**gpu, "__name__": "DCGM_FI_DEV_GPU_UTIL"}, GPU_UTIL),
        gauge({**gpu, "__name__": "DCGM_FI_DEV_FB_USED"}, 30000),
        gauge({**gpu, "__name__": "DCGM_FI_DEV_FB_FREE"}, 50000),
        gauge({**gpu, "__name__": "DCGM_FI_DEV_GPU_TEMP"}, 61),
        gauge({**gpu, "__name__": "DCGM_FI_DEV_POWER_USAGE"}, 310),
        gauge({**gpu, "__name__": "DCGM_FI_DEV_XID_ERRORS"}, 0),
        counter(
            {**pc.KSM, "__name__": "kube_pod_container_status_restarts_total", "pod": pc.POD, "container": container}, 0
        ),
    ]


def quality_series(container: str, *, device: str) -> list[pc.Metric]:
    """The `slm_*` contract the built-in server exposes and the sidecar exposes in front of any other runtime:
    output quality, finish reasons, drift, the served model (server/slm_server/metrics.py)."""
    target = {**pc.SCRAPE, "container": container}
    route = {**target, "endpoint": "/v1/completions"}
    per_model = {**route, "model": MODEL}
    return [
        gauge({**target, "__name__": "up"}, 1),
        gauge(
            {
                **target,
                "__name__": "slm_model_info",
                "model": MODEL,
                "source": "org/tiny",
                "dtype": "float32",
                "device": device,
                "max_context": "2048",
            },
            1,
        ),
        *histogram({**per_model, "__name__": "slm_request_perplexity"}, PERPLEXITY_BUCKETS, 12),
        *histogram({**route, "__name__": "model_output_tokens"}, TOKEN_COUNT_BUCKETS, 3.5, mean=3),
        *histogram({**per_model, "__name__": "slm_request_tokens_per_second"}, TOKENS_PER_SECOND_BUCKETS, 30),
        counter({**per_model, "__name__": "slm_request_finish_total", "finish_reason": "stop"}, REQUESTS - FAILED),
        counter({**per_model, "__name__": "slm_request_finish_total", "finish_reason": "error"}, FAILED),
        counter({**per_model, "__name__": "slm_empty_outputs_total"}, 1),
        counter({**per_model, "__name__": "slm_repetitive_outputs_total"}, 1),
        counter(
            {
                **target,
                "__name__": "slm_structured_outputs_total",
                "model": MODEL,
                "format": "json_schema",
                "result": "incomplete",
            },
            1,
        ),
        gauge({**target, "__name__": "slm_drift_score", "model": MODEL, "signal": "perplexity"}, 0.1),
        gauge({**target, "__name__": "slm_drift_detected", "model": MODEL, "signal": "perplexity"}, 0),
        gauge({**target, "__name__": "slm_fault_injection_enabled", "model": MODEL}, 0),
    ]


def builtin_series() -> list[pc.Metric]:
    """The built-in server's own engine series (container "server")."""
    target = {**pc.SCRAPE, "container": "server"}
    route = {**target, "endpoint": "/v1/completions"}
    per_model = {**route, "model": MODEL}
    model = {**target, "model": MODEL}
    return [
        *quality_series("server", device="cuda:0"),
        counter({**route, "__name__": "api_requests_total", "status": "200"}, REQUESTS - FAILED),
        counter({**route, "__name__": "api_requests_total", "status": "500"}, FAILED),
        counter({**target, "__name__": "api_requests_total", "endpoint": "/healthz", "status": "200"}, 60),
        *histogram({**route, "__name__": "api_request_duration_seconds"}, REQUEST_DURATION_BUCKETS, E2E_P95),
        *histogram({**per_model, "__name__": "slm_time_to_first_token_seconds"}, TTFT_BUCKETS, TTFT_P95),
        *histogram(
            {**per_model, "__name__": "slm_inter_token_latency_seconds"},
            ITL_BUCKETS,
            ITL_P95,
            per_minute=GENERATED_TOKENS,
        ),
        counter({**per_model, "__name__": "slm_prompt_tokens_total"}, PROMPT_TOKENS),
        counter({**per_model, "__name__": "slm_generation_tokens_total"}, GENERATED_TOKENS),
        gauge({**model, "__name__": "slm_requests_in_flight"}, RUNNING),
        gauge({**model, "__name__": "slm_requests_queued"}, WAITING),
        gauge({**model, "__name__": "slm_max_concurrent_requests"}, 8),
        gauge({**model, "__name__": "slm_max_queue"}, 16),
        gauge({**model, "__name__": "slm_model_load_seconds"}, 12),
        counter({**model, "__name__": "slm_forward_passes_total"}, 600),
        counter({**model, "__name__": "slm_forward_pass_generations_total"}, 1800),
        gauge({**model, "__name__": "slm_kv_cache_bytes"}, 2**20),
        gauge({**model, "__name__": "slm_kv_cache_positions", "kind": "token"}, 900),
        gauge({**model, "__name__": "slm_kv_cache_positions", "kind": "padding"}, 100),
        counter({**model, "__name__": "slm_prefix_cache_hits_total"}, 300),
        gauge({**model, "__name__": "slm_prefix_cache_bytes"}, 2**19),
        gauge({**model, "__name__": "slm_prefix_cache_capacity_bytes"}, 2**22),
        gauge({**target, "__name__": "slm_filesystem_avail_bytes", "mountpoint": "/data"}, 40e9),
        gauge({**target, "__name__": "slm_filesystem_size_bytes", "mountpoint": "/data"}, 100e9),
        *dcgm_and_kube("server"),
    ]


def native(runtime: str, signal: str, **values: str) -> dict[str, str]:
    """Labels of `runtime`'s own series for `signal` (name and label names from the mapping)."""
    row = rc.metric(runtime, signal)
    return {**pc.SCRAPE, "container": runtime, "__name__": row["name"], **rc._native_labels(runtime, signal, **values)}


def ranks(runtime: str, signal: str) -> list[dict[str, str]]:
    """SGLang's scheduler series come once per tensor-parallel rank (each with the pod's figure)."""
    if "tp_rank" in rc.metric(runtime, signal)["labels"]:
        return [native(runtime, signal, tp_rank=rank) for rank in rc.SGLANG_RANKS]
    return [native(runtime, signal)]


def third_party_series(runtime: str) -> list[pc.Metric]:
    """A third-party runtime's pod: its own series where the mapping has the signal, and the sidecar's."""
    has = {signal for signal, row in rc.MAPPING["runtimes"][runtime]["metrics"].items() if "missing" not in row}
    metrics = [
        *quality_series(SIDECAR, device=runtime),
        gauge({**pc.SCRAPE, "container": runtime, "__name__": "up"}, 1),
        *dcgm_and_kube(runtime),
    ]
    # The sidecar's limits and load time are 0: the runtime's are not the sidecar's.
    sidecar = {**pc.SCRAPE, "container": SIDECAR, "model": MODEL}
    metrics += [
        gauge({**sidecar, "__name__": name}, 0)
        for name in ("slm_max_concurrent_requests", "slm_max_queue", "slm_model_load_seconds")
    ]
    # The sidecar's own counts of what passes through it, which no panel may add to the runtime's figures.
    through = {**pc.SCRAPE, "container": SIDECAR, "endpoint": "/v1/completions"}
    metrics += [
        counter({**through, "__name__": "api_requests_total", "status": "200"}, REQUESTS),
        gauge({**sidecar, "__name__": "slm_requests_in_flight"}, 7),
        counter({**through, "__name__": "slm_prompt_tokens_total", "model": MODEL}, 500),
        counter({**through, "__name__": "slm_generation_tokens_total", "model": MODEL}, 700),
    ]
    if runtime == "vllm":
        metrics += [
            counter(native("vllm", "requests", finished_reason="stop"), REQUESTS - FAILED),
            counter(native("vllm", "requests", finished_reason="error"), FAILED),
        ]
    elif runtime == "sglang":
        metrics += [
            counter(native("sglang", "requests"), REQUESTS),
            counter(native("sglang", "errors", endpoint="/v1/completions", status_code="200"), REQUESTS - FAILED),
            counter(native("sglang", "errors", endpoint="/v1/completions", status_code="500"), FAILED),
            counter(native("sglang", "errors", endpoint="/health", status_code="200", method="GET"), 60),
        ]
    elif runtime == "tgi":
        metrics += [
            counter(native("tgi", "requests"), REQUESTS),
            counter(native("tgi", "errors", err="generation"), FAILED),
            counter(native("tgi", "errors", err="validation"), 5),
        ]
    for signal, p95, per_minute in (
        ("e2e_latency", E2E_P95, REQUESTS),
        ("ttft", TTFT_P95, REQUESTS),
        ("inter_token_latency", ITL_P95, GENERATED_TOKENS),
    ):
        if signal in has and rc.metric(runtime, signal)["type"] == "histogram":
            metrics += histogram(native(runtime, signal), rc.bounds(runtime, signal), p95, per_minute=per_minute)
    if runtime == "llamacpp":  # a mean only: seconds spent generating, over tokens generated
        metrics.append(counter(native(runtime, "inter_token_latency"), GENERATED_TOKENS * ITL_P95))
    for signal, value in (("running", RUNNING), ("waiting", WAITING), ("kv_cache_usage", KV_USAGE)):
        if signal in has:
            metrics += [gauge(labels, value) for labels in ranks(runtime, signal)]
    if "preemptions" in has:
        metrics += [counter(labels, PREEMPTIONS) for labels in ranks(runtime, "preemptions")]
    for signal, per_minute in (("prompt_tokens", PROMPT_TOKENS), ("generated_tokens", GENERATED_TOKENS)):
        if rc.metric(runtime, signal)["type"] == "histogram":  # TGI: read the per-request histogram's sum
            metrics += histogram(
                native(runtime, signal), [1, 10, 100], 5, mean=per_minute / REQUESTS, parts=("_sum", "_count")
            )
        else:
            metrics.append(counter(native(runtime, signal), per_minute))
    return metrics


def pod_series(runtime: str) -> list[pc.Metric]:
    return builtin_series() if runtime == "builtin" else third_party_series(runtime)


# ---- the dashboards' queries ----------------------------------------------------------------------------------


def grafana_to_promql(expr: str) -> str:
    """A panel query as Grafana sends it: the rate interval of a 1m scrape, the deployment's model."""
    return expr.replace("$__rate_interval", "5m").replace('"$model"', f'"{MODEL}"').replace('"$namespace"', '".*"')


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        D: render_dashboard(name=NAME, namespace=NAMESPACE, model=MODEL, alerts=ALERTS),
        F: render_fleet_dashboard(),
    }


def panel_queries() -> dict[tuple[str, str, str], str]:
    """{(dashboard, panel title, legend): PromQL} of every target of both dashboards."""
    found = {}
    for key, dashboard in dashboards().items():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                found[(key, panel["title"], target["legendFormat"])] = target["expr"]
    return found


def panels(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {panel["title"]: panel for panel in dashboard["panels"] if panel["type"] != "row"}


# ---- the promtool run -------------------------------------------------------------------------------------------


def has_data(expr: str) -> str:
    """1 when `expr` returns at least one sample that is a number (NaN is what Grafana draws as nothing)."""
    return f"group(({expr}) == ({expr}))"


def recorded_series(groups: list[dict[str, Any]]) -> set[str]:
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def alert_reads(runtime: str) -> dict[str, set[str]]:
    """{alert rendered for `runtime`: the series its expression reads}."""
    groups = render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=ALERTS, runtime=runtime)
    reads: dict[str, set[str]] = {}
    for group in groups:
        for rule in group["rules"]:
            if "alert" in rule:
                reads.setdefault(rule["alert"], set()).update(metric_names(rule["expr"]))
    return reads


def promtool_document(runtime: str, rule_files: Mapping[str, str], order: list[str]) -> dict[str, Any]:
    sel = f'namespace="{NAMESPACE}",job="{NAME}"'
    tests = []
    for key, expr in panel_queries().items():
        wanted = [] if key in EMPTY[runtime] else [{"labels": "{}", "value": 1}]
        tests.append({"expr": has_data(grafana_to_promql(expr)), "eval_time": EVAL, "exp_samples": wanted})
    for (title, legend, how), (value, runtimes) in VALUES.items():
        if runtime in runtimes:
            expr = grafana_to_promql(panel_queries()[(D, title, legend)])
            tests.append(
                {
                    "expr": f"round({how}({expr}) * 1000)",
                    "eval_time": EVAL,
                    "exp_samples": [{"labels": "{}", "value": value}],
                }
            )
    # Every series an alert rendered for the runtime reads has data: the alert can fire on this runtime.
    for reads in alert_reads(runtime).values():
        for name in sorted(n for n in reads if n.startswith("slm:")):
            tests.append(
                {"expr": has_data(f"{name}{{{sel}}}"), "eval_time": EVAL, "exp_samples": [{"labels": "{}", "value": 1}]}
            )
    return {
        "rule_files": list(rule_files.values()),
        "evaluation_interval": "1m",
        "group_eval_order": order,
        "tests": [
            {
                "name": f"[{runtime}] every panel query and alert series of one deployment",
                "interval": "1m",
                "input_series": [m.input_series([(1.0, MINUTES)]) for m in pod_series(runtime)],
                "promql_expr_test": tests,
            }
        ],
    }


def run_promtool(runtime: str, directory: Path) -> subprocess.CompletedProcess[str]:
    groups = with_shared(render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=ALERTS, runtime=runtime))
    paths = write_rule_files(directory, groups)
    path = directory / "test-panels.yaml"
    document = promtool_document(runtime, paths, [group["name"] for group in groups])
    path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
    return subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=300)


# ---- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_panel_query_has_data_unless_the_runtime_lacks_the_signal(runtime: str, tmp_path: Path) -> None:
    """On the runtime's native series, through the chart's shared rules: each panel query returns numbers
    exactly when the runtime has its signal, the main panels read the same values for every runtime, and
    every series the runtime's alerts read has data."""
    assert set(EMPTY[runtime]) <= set(panel_queries()), sorted(set(EMPTY[runtime]) - set(panel_queries()))
    targets = sum(len(panel.get("targets", [])) for dashboard in dashboards().values() for panel in dashboard["panels"])
    assert len(panel_queries()) == targets  # every target checked: no two share a panel and a legend
    result = run_promtool(runtime, tmp_path)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


def test_the_cases_fail_when_a_runtime_signal_is_not_recorded(tmp_path: Path) -> None:
    """Not vacuous: with vLLM's recording of running requests misspelt, the panel's query has no data."""
    groups = with_shared(render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=ALERTS, runtime="vllm"))
    for group in groups:
        for rule in group["rules"]:
            rule["expr"] = rule["expr"].replace("vllm:num_requests_running", "vllm:num_requests_runing")
    paths = write_rule_files(tmp_path, groups)
    path = tmp_path / "test-panels.yaml"
    path.write_text(yaml.safe_dump(promtool_document("vllm", paths, [g["name"] for g in groups]), width=1000))
    result = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "slm:requests_running:sum" in result.stdout + result.stderr


def test_no_panel_reads_a_runtimes_own_engine_series() -> None:
    """Engine signals come from the shared rules' slm:* series only: no panel names vLLM's, SGLang's, TGI's or
    llama.cpp's series, nor the built-in server's own engine series the rules translate."""
    builtin_engine = {
        "api_request_duration_seconds_bucket",
        "slm_time_to_first_token_seconds_bucket",
        "slm_inter_token_latency_seconds_bucket",
        "slm_requests_in_flight",
        "slm_requests_queued",
        "slm_prompt_tokens_total",
        "slm_generation_tokens_total",
        "api_requests_total",
    }
    natives = set().union(*runtime_metric_names().values()) | builtin_engine
    for (dashboard, title, legend), expr in panel_queries().items():
        assert not metric_names(expr) & natives, (dashboard, title, legend, expr)


def test_the_sidecar_has_none_of_the_series_only_the_built_in_engine_measures() -> None:
    """What the dashboards take for the built-in engine's own (not answerable in front of another runtime) is
    absent from the real sidecar's /metrics, or 0: its limits and load time, which the queries leave out."""
    registry = CollectorRegistry()
    create_app(SidecarSettings(served_model_name=MODEL, runtime="vllm"), registry=registry)
    exposed = {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples}  # fmt: skip
    assert {name: exposed[name] for name in BUILTIN_ENGINE_SERIES if name in exposed} == {
        "slm_max_concurrent_requests": 0, "slm_max_queue": 0, "slm_model_load_seconds": 0,
    }  # fmt: skip
    # …while the quality series the panels read from it are there.
    assert {"slm_request_perplexity_bucket", "model_output_tokens_bucket"} <= set(exposed)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_panel_a_runtime_cannot_fill_says_so(runtime: str) -> None:
    """Each panel that stays empty for the runtime shows a text naming it, with the reason in its description;
    the others carry no such text for it."""
    rendered = dashboards()
    for key, dashboard in rendered.items():
        for title, panel in panels(dashboard).items():
            no_value = panel.get("fieldConfig", {}).get("defaults", {}).get("noValue", "")
            if runtime in SILENT.get((key, title), set()):
                assert "Not exposed by" in no_value and TITLES[runtime] in no_value, (key, title, no_value)
                assert f"{TITLES[runtime]}" in panel["description"].split("Not exposed by", 1)[1], (key, title)
            else:
                assert TITLES[runtime] not in no_value, (key, title, no_value)
    # Every query of a silent panel is among those the runtime cannot answer (the table above is consistent).
    for (key, title), runtimes in SILENT.items():
        legends = {legend for (k, t, legend) in panel_queries() if (k, t) == (key, title)}
        if runtime in runtimes:
            assert legends and {(key, title, legend) for legend in legends} <= EMPTY[runtime], (key, title)


def test_the_time_to_first_token_panel_names_the_runtimes_without_it_and_why() -> None:
    """One dashboard for every runtime (the operator renders it without knowing the runtime), so the text
    names every runtime that lacks the signal, and the description gives each one's own reason."""
    (panel,) = [p for p in dashboards()[D]["panels"] if p["title"] == "Time to first token"]
    assert panel["fieldConfig"]["defaults"]["noValue"].startswith("Not exposed by TGI or llama.cpp")
    assert "Not exposed by TGI: TGI records no time to first token" in panel["description"]
    assert "Not exposed by llama.cpp: llama-server has no time-to-first-token metric" in panel["description"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_alert_reads_what_the_runtime_records_or_is_not_rendered(runtime: str) -> None:
    """Every alert name is rendered for the runtime or listed by unrendered_alerts(runtime), never both; a
    rendered alert reads only slm:* series the runtime's shared group (or the deployment's drift rules)
    records, or Prometheus' and kube-state-metrics' own series."""
    every = set(ALERT_NAMES) | set(runtime_alert_names())
    reads = alert_reads(runtime)
    unrendered = set(unrendered_alerts(runtime))
    assert set(reads) | unrendered == every and not set(reads) & unrendered
    charted = yaml.safe_load((REPO_ROOT / "charts/slm-monitoring/rules/recording-rules.yaml").read_text())["groups"]
    groups = [g for g in charted if g["name"] == f"slm-shared.runtime-{runtime}"]
    if runtime != "builtin":  # the monitoring sidecar in the pod (docs/sidecar.md)
        groups += [g for g in charted if g["name"] == "slm-shared.sidecar"]
    own = recorded_series(render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=ALERTS, runtime=runtime))
    available = recorded_series(groups) | own
    outside = {
        "up",
        "kube_pod_container_status_waiting_reason",
        "kube_pod_status_ready",
        "kube_deployment_status_replicas_ready",
    }
    for alert, names in reads.items():
        assert names <= available | outside, (alert, sorted(names - available - outside))


def _docs_rows() -> dict[str, dict[str, str]]:
    """docs/reference/dashboards.md's per-runtime table: {panel: {runtime title: cell}}."""
    page = (REPO_ROOT / "docs/reference/dashboards.md").read_text()
    section = page.split("## Per runtime", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


def test_the_reference_page_says_how_each_panel_behaves_per_runtime() -> None:
    rows = _docs_rows()
    docs_titles = {"builtin": "built-in", "vllm": "vLLM", "sglang": "SGLang", "tgi": "TGI", "llamacpp": "llama.cpp"}
    for (key, title), runtimes in SILENT.items():
        panel = title if key == D else f"{title} (fleet)"
        for runtime, column in docs_titles.items():
            cell = rows[panel][column]
            assert cell.startswith("not exposed") == (runtime in runtimes), (panel, column, cell)
    # A panel that shows data with some of its lines missing says which.
    assert rows["Response time p50 / p95"]["vLLM"].startswith("without p95 {{endpoint}}, p50 {{endpoint}}")
    assert rows["Inter-token latency"]["llama.cpp"] == "without p95, p50"
    assert rows["Time to first token"]["vLLM"] == "yes"
