"""The promtool cases of every alert family, run on each third-party runtime's native series.

The built-in cases (promtool_cases.py) build their input series through the built-in server's metrics.
Here the same cases are built, then each input series is replaced by what the runtime itself exposes for
that signal, with the names, types and labels of data/runtime_metrics.yaml (which
tests/runtimes/test_metric_names.py checks against each runtime's own code) and the target labels the
Prometheus Operator gives a series scraped from the runtime's container. Histograms cannot be translated
bucket for bucket: the latency cases are built anew on each runtime's own bucket bounds. The alerts the
runtime cannot feed are not rendered for it (tests/runtimes/test_rules_mapping.py), so their families are
not run; KV-cache saturation and preemptions get cases of their own.

Expectations stay literal: promtool_expected.yaml's `defaults` and runtime_promtool_expected.yaml.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from slm_devtools.tools import REPO_ROOT

from . import promtool_cases as pc

RUNTIME_EXPECTED_FILE = Path(__file__).with_name("runtime_promtool_expected.yaml")
MAPPING: dict[str, Any] = yaml.safe_load(
    (REPO_ROOT / "operator/slm_operator/monitoring/data/runtime_metrics.yaml").read_text()
)
RUNTIMES = ("vllm", "sglang", "tgi", "llamacpp")
# Which families each runtime can run (the others' alerts are not rendered for it).
FAMILIES = {
    "vllm": ["errors", "latency", "gpu", "capacity", "availability", "slo", "drift-output_length"],
    "sglang": ["errors", "latency", "gpu", "capacity", "availability", "slo", "drift-output_length"],
    "tgi": ["errors", "latency", "gpu", "availability", "slo", "drift-output_length"],
    "llamacpp": ["gpu", "availability"],
}
NON_TRAFFIC = {"/metrics", "/healthz", "/readyz"}
# TGI: every `*_duration` histogram has 35 geometric buckets from 0.15 ms, x1.5 each (router/src/server.rs,
# docs/reference/runtimes.md); the other runtimes' bounds are in the mapping.
TGI_DURATION_BUCKETS = [0.00015 * 1.5**n for n in range(35)]
SGLANG_RANKS = ("0", "1")  # two tensor-parallel ranks: scheduler series come once per rank


@functools.cache
def runtime_expected() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(RUNTIME_EXPECTED_FILE.read_text())
    return document


def expected(runtime: str) -> pc.Expected:
    """promtool_expected.yaml's defaults with the runtime-only alerts and levels of runtime_promtool_expected,
    and what differs for `runtime` there."""
    expect = pc.Expected("defaults")
    extra = runtime_expected()
    expect.settings = {**copy.deepcopy(expect.settings), **extra["settings"]}
    alerts = copy.deepcopy(expect._alerts)
    for alert, levels in [*extra["alerts"].items(), *extra["per_runtime"][runtime].items()]:
        alerts.setdefault(alert, {}).update(levels)
    expect._alerts = alerts
    return expect


def metric(runtime: str, signal: str) -> dict[str, Any]:
    row: dict[str, Any] = MAPPING["runtimes"][runtime]["metrics"][signal]
    assert "missing" not in row, (runtime, signal)
    return row


# ---- the native series of each runtime -------------------------------------------------------------------


def _native_labels(runtime: str, signal: str, **values: str) -> dict[str, str]:
    """The runtime's own labels of `signal`'s series (label names from the mapping), filled with `values`."""
    defaults = {"model_name": pc.MODEL, "engine": "0", "engine_type": "unified", "is_streaming": "false",
                "pp_rank": "0", "tp_rank": "0", "moe_ep_rank": "0", "method": "POST"}  # fmt: skip
    labels = {}
    for name in metric(runtime, signal)["labels"]:
        labels[name] = values.get(name, defaults.get(name, ""))
        assert labels[name], (runtime, signal, name)
    return labels


def _target(runtime: str, labels: Mapping[str, str]) -> dict[str, str]:
    """Target labels of the Prometheus Operator's scrape of the runtime's container (job, pod, container...)."""
    return {key: value for key, value in labels.items() if key in pc.SCRAPE} | {"container": runtime}


def translate(runtime: str, built: pc.Metric) -> list[pc.Metric]:
    """What `runtime` exposes in place of one input series of the built-in cases ([] where it has none)."""
    labels = dict(built.labels)
    name = labels["__name__"]
    if labels.get("container") == runtime:  # built here on the runtime's own series already
        return [built]
    if labels.get("container") == "server":
        labels["container"] = runtime
    if name == "up" or name.startswith(("DCGM_", "kube_")):
        return [pc.Metric(labels, built.fn, built.counter)]
    if name.startswith("nvidia_gpu_"):  # the built-in server's own NVML gauges
        return []
    target = _target(runtime, labels)

    def native(signal: str, fn: Callable[[float], float | None] = built.fn, **values: str) -> list[pc.Metric]:
        row = metric(runtime, signal)
        series = row["name"] + values.pop("_suffix", "")
        return [pc.Metric({**target, "__name__": series, **_native_labels(runtime, signal, **values)}, fn, True)]

    if name == "api_requests_total":
        endpoint, status = labels["endpoint"], labels["status"]
        failed = status.startswith("5")
        if runtime == "sglang":  # HTTP responses by route and status: probes and scrapes included
            method = "GET" if endpoint in NON_TRAFFIC else "POST"
            return native("errors", endpoint=endpoint, status_code=status, method=method)
        if endpoint in NON_TRAFFIC:
            return []  # vLLM's and TGI's engine series count no probe or scrape
        if runtime == "vllm":
            return native("requests", finished_reason="error" if failed else "stop")
        if runtime == "tgi":
            if failed:
                return native("errors", err="generation")
            # One counter of every request: the built-in cases split REQUESTS_PER_MINUTE between a 2xx and
            # a 5xx series (level = the share of 5xx), so the whole is that constant.
            assert built.fn(0.0) == pc.REQUESTS_PER_MINUTE, "the 2xx series no longer carries all traffic"
            return native("requests", fn=lambda _: pc.REQUESTS_PER_MINUTE)
    if name in ("model_output_tokens_sum", "model_output_tokens_count"):  # output length drift
        counted = name.endswith("_count")
        if runtime == "tgi":
            return native("generated_tokens", _suffix="_count" if counted else "_sum")
        if counted:
            # Finished requests: vLLM's by finish reason, SGLang's tokenizer counter.
            return native("requests", finished_reason="stop") if runtime == "vllm" else native("requests")
        return native("generated_tokens")
    raise AssertionError(f"no {runtime} series stands for {name} in these cases")


def _translated_test(runtime: str) -> Callable[..., dict[str, Any]]:
    def test(name: str, segments: pc.Segments, metrics: list[pc.Metric], checks: list[dict]) -> dict[str, Any]:
        native = [m for built in metrics for m in translate(runtime, built)]
        return {
            "name": f"[{runtime}] {name}",
            "interval": "1m",
            "input_series": [m.input_series(segments) for m in native],
            "alert_rule_test": checks,
        }

    return test


@contextlib.contextmanager
def translating(runtime: str) -> Iterator[None]:
    """While active, every case promtool_cases builds is written with the runtime's series."""
    original = pc._test
    pc._test = _translated_test(runtime)
    try:
        yield
    finally:
        pc._test = original


# ---- latency: each runtime's own buckets -------------------------------------------------------------------


def native_histogram(runtime: str, signal: str, bounds: list[float], **values: str) -> Callable[[], list[pc.Metric]]:
    """Bucket counters on the runtime's own `bounds` whose 5m p95 (histogram_quantile) equals the level."""

    def fractions(level: float) -> list[float]:
        # The rest in the first bucket, a share in the bucket holding `level` (strictly inside it), so that
        # linear interpolation at rank 0.95 lands exactly on `level`.
        lower = 0.0
        for index, upper in enumerate(bounds):
            if level < upper:
                assert index > 0 and level > lower, f"level {level} on a bound or in the first bucket"
                position = (level - lower) / (upper - lower)
                share = 0.05 / (1 - position)
                result = [0.0] * len(bounds)
                result[index] += share
                result[0] += 1 - share
                return result
            lower = upper
        raise ValueError(level)

    row = metric(runtime, signal)
    target = {**pc.SCRAPE, "container": runtime}

    def build() -> list[pc.Metric]:
        metrics = []
        for index, upper in enumerate([*bounds, math.inf]):
            le = "+Inf" if upper == math.inf else pc._num(upper)

            def cumulative(level: float, index: int = index) -> float:
                return pc.REQUESTS_PER_MINUTE * sum(fractions(level)[: index + 1])

            labels = {**target, **_native_labels(runtime, signal, **values), "__name__": f"{row['name']}_bucket",
                      "le": le}  # fmt: skip
            metrics.append(pc.Metric(labels, cumulative, True))
        return metrics

    return build


def bounds(runtime: str, signal: str) -> list[float]:
    row = metric(runtime, signal)
    if runtime == "tgi":
        assert "buckets" not in row
        return TGI_DURATION_BUCKETS
    return [float(b) for b in row["buckets"]]


def latency_signals(runtime: str, settings: Mapping[str, Any]) -> list[pc.Signal]:
    signals = []
    wanted = [("SLMSlowResponseTime", "latencyP95", "e2e_latency")]
    if "missing" not in MAPPING["runtimes"][runtime]["metrics"]["ttft"]:
        wanted.append(("SLMHighTimeToFirstToken", "timeToFirstToken", "ttft"))
    for alert, config, signal in wanted:
        threshold = float(settings[config]["thresholdSeconds"])
        signals.append(pc.Signal(
            alert=alert, config=config, rate=True,
            metrics=native_histogram(runtime, signal, bounds(runtime, signal))(),
            above=1.2 * threshold, below=0.975 * threshold, normal=0.475 * threshold,
        ))  # fmt: skip
    return signals


# ---- KV cache and preemptions (vLLM, SGLang) ----------------------------------------------------------------


def _per_rank(runtime: str, signal: str, fn: Callable[[float], float | None], counter: bool) -> list[pc.Metric]:
    """The series of a scheduler-side signal: SGLang has one per tensor-parallel rank, each the pod's own."""
    row = metric(runtime, signal)
    target = {**pc.SCRAPE, "container": runtime}
    ranks = SGLANG_RANKS if "tp_rank" in row["labels"] else ("0",)
    return [
        pc.Metric({**target, "__name__": row["name"], **_native_labels(runtime, signal, tp_rank=rank)}, fn, counter)
        for rank in ranks
    ]


def capacity_signals(runtime: str, settings: Mapping[str, Any]) -> list[pc.Signal]:
    kv_t = float(settings["kvCacheSaturation"]["thresholdPercent"])
    pre_t = float(settings["requestPreemptions"]["thresholdPerSecond"])
    return [
        pc.Signal(
            alert="SLMKVCacheSaturated",
            config="kvCacheSaturation",
            metrics=_per_rank(runtime, "kv_cache_usage", lambda level: level / 100, counter=False),
            above=kv_t + 1,
            below=kv_t - 1,
            normal=40,
        ),
        pc.Signal(
            alert="SLMRequestsPreempted",
            config="requestPreemptions",
            rate=True,
            # Per-minute increments of the preemption counter at `level` preemptions per second. An absolute
            # rate (not a ratio) of a series that starts with the case is extrapolated low at first: 5x the
            # threshold is past it from the first evaluation (0.3x the level then), as the cases assume.
            metrics=_per_rank(runtime, "preemptions", lambda level: 60 * level, counter=True),
            above=5 * pre_t,
            below=0.8 * pre_t,
            normal=0,
        ),
    ]


def _tgi_client_errors_case(expect: pc.Expected) -> dict[str, Any]:
    """TGI: validation and overload failures (4xx) are the clients', not the server's: no SLMHighErrorRate."""
    alert = "SLMHighErrorRate"
    for_min = pc._minutes(str(expect.settings["errorRate"]["for"]))
    target = {**pc.SCRAPE, "container": "tgi"}
    count, failure = metric("tgi", "requests")["name"], metric("tgi", "errors")["name"]
    metrics = [
        pc.Metric({**target, "__name__": count}, lambda _: pc.REQUESTS_PER_MINUTE, True),
        pc.Metric({**target, "__name__": failure, "err": "validation"}, lambda _: 0.3 * pc.REQUESTS_PER_MINUTE, True),
        pc.Metric({**target, "__name__": failure, "err": "overloaded"}, lambda _: 0.2 * pc.REQUESTS_PER_MINUTE, True),
        pc.Metric({**target, "__name__": failure, "err": "generation"}, lambda _: 0.01 * pc.REQUESTS_PER_MINUTE, True),
    ]
    return {
        "name": f"[tgi] {alert} counts only the server's failures: 50% validation and overload errors, 1% generation",
        "interval": "1m",
        "input_series": [m.input_series([(0, for_min + 8)]) for m in metrics],
        "alert_rule_test": [pc._check(alert, for_min + 2), pc._check(alert, for_min + 6)],
    }


# ---- assembly -----------------------------------------------------------------------------------------------


def build_runtime_test_files(
    runtime: str, *, groups: list[dict[str, Any]], rule_files: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """{family: promtool test document} of `runtime`, for its shared group and its deployment's groups."""
    expect = expected(runtime)
    settings = expect.settings
    with translating(runtime):
        builders: dict[str, Callable[[], list[dict]]] = {
            "errors": lambda: pc._threshold_family([pc._error_signal(settings)], expect),
            "latency": lambda: pc._threshold_family(latency_signals(runtime, settings), expect),
            "gpu": lambda: (
                pc._threshold_family([s for s in pc._gpu_signals(settings) if "pynvml" not in s.variant], expect)
                + pc._gpu_extra_cases(expect)
            ),
            "capacity": lambda: pc._threshold_family(capacity_signals(runtime, settings), expect),
            "availability": lambda: (
                pc._threshold_family(pc._availability_signals(settings), expect) + pc._target_missing_cases(expect)
            ),
            "slo": lambda: pc._burn_cases(expect),
            "drift-output_length": lambda: pc._drift_cases(expect, "output_length"),
        }
        families = {family: builders[family]() for family in FAMILIES[runtime]}
    if runtime == "tgi":
        families["errors"].append(_tgi_client_errors_case(expect))
    order = [group["name"] for group in groups]
    deployment = f"slm-{pc.NAME}."
    shared = [name for name in order if not name.startswith(deployment)]
    documents = {}
    for family, cases in families.items():
        assert cases, (runtime, family)
        names = [*shared, f"{deployment}{family}"] if family.startswith("drift-") else [*shared, f"{deployment}alerts"]
        documents[family] = {
            "rule_files": [rule_files[name] for name in names],
            "evaluation_interval": "1m",
            "group_eval_order": [name for name in order if name in names],
            "tests": cases,
        }
    return documents
