"""`promtool test rules` files for the rules exactly as a cluster loads them: the shared recording rules
as the chart ships them, together with one deployment's PrometheusRule as the operator renders it.

One file per alert family (kubernetes-mixin style), one promtool test group per case, case names are
sentences. Every threshold alert gets the same checks: fires after `for` at a level just past the
threshold with its exact labels and annotations, stays silent just before `for` elapses, stays silent
just below the threshold, ignores a short spike, resolves after recovery. Burn-rate, drift and
"metrics absent" alerts get cases of their own.

Nothing here is read from the rules under test. What each variant of the resource should put in force
(thresholds, `for`, windows) and every alert the cases expect (labels and annotations, $value
included) are written out in promtool_expected.yaml; input series are built from "levels" (the value
the alert's expression should see: an error ratio, a p95 in seconds, a percentage...) through the
metrics the server, DCGM or kube-state-metrics would expose (the shared rules turn them into the series
the alerts read), so a wrong metric name, label, formula, threshold or annotation in rules.yaml makes a
case fail. The burn-rate and drift cases find when an
alert fires by simulating the PromQL arithmetic of the SRE workbook and of a z-score in plain Python.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "llm"
NAME = "phi"
MODEL = "tiny-gpt2"
POD = "phi-6d9f8b7c5-x2k4q"
OTHER_POD = "phi-mini-5c8d7f9b6-q7w2e"  # a pod of another deployment ("phi-mini") in the same namespace
SCRAPE = {  # what the ServiceMonitor gives every server series
    "namespace": NAMESPACE,
    "job": NAME,
    "pod": POD,
    "instance": "10.0.1.5:8000",
    "service": NAME,
    "container": "server",
}
DCGM = {  # what dcgm-exporter with pod mapping gives a GPU series
    "gpu": "0",
    "UUID": "GPU-5f2a",
    "device": "nvidia0",
    "modelName": "NVIDIA H100",
    "Hostname": "gpu-node-1",
    "namespace": NAMESPACE,
    "pod": POD,
    "container": "server",
    "job": "dcgm-exporter",
    "instance": "10.0.2.7:9400",
}
KSM = {"job": "kube-state-metrics", "instance": "10.0.3.9:8080", "namespace": NAMESPACE}
REQUESTS_PER_MINUTE = 1000.0
COUNTER_START = 1e6

Segments = list[tuple[float, int]]  # (level, number of one-minute steps)
EXPECTED_FILE = Path(__file__).with_name("promtool_expected.yaml")
DRIFT_FLOOR_RATIO = 0.05  # the stddev floor docs/reference/alerts.md documents: 5 % of the baseline mean
DRIFT_FLOOR_ABS = 1e-3
_DURATION_RE = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@functools.cache
def expected_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXPECTED_FILE.read_text())
    return document


def seconds(duration: str) -> int:
    """Seconds in a duration as written in promtool_expected.yaml ("1h24m", "3m30s")."""
    parts = _DURATION_RE.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


class Expected:
    """The literal expectations of one variant of the resource (promtool_expected.yaml)."""

    def __init__(self, variant: str) -> None:
        document = expected_document()[variant]
        self.settings: dict[str, Any] = document["settings"]
        self.burn_rates: list[dict[str, Any]] = document["burn_rates"]
        self.drift: dict[str, dict[str, Any]] = document["drift"]
        self._alerts: dict[str, dict[str, Any]] = document.get("alerts", {})

    def __call__(self, alert: str, value: float) -> dict[str, Any]:
        """The alert as promtool must see it when its expression reads `value`."""
        key = format(value, ".4g")
        try:
            body = self._alerts[alert][key]
        except KeyError:
            raise KeyError(f"promtool_expected.yaml has no {alert} at {key}") from None
        return {"exp_labels": body["labels"], "exp_annotations": body["annotations"]}


def _num(value: float) -> str:
    return format(value, ".12g")


def _series_text(labels: Mapping[str, str]) -> str:
    name = labels["__name__"]
    rest = ",".join(f'{key}="{value}"' for key, value in labels.items() if key != "__name__")
    return f"{name}{{{rest}}}"


@dataclass
class Metric:
    """One input series whose sample (gauge) or per-minute increment (counter) is fn(level)."""

    labels: dict[str, str]
    fn: Callable[[float], float | None]
    counter: bool = False

    def values(self, segments: Segments) -> str:
        parts: list[str] = []
        if self.counter:
            # Counters start high: rate() does not extrapolate a counter below zero, so one that
            # starts at 0 would be extrapolated differently from its sibling and skew ratios.
            total = COUNTER_START
            parts.append(_num(total))
            for level, steps in segments:
                increment = self.fn(level) or 0.0
                parts.append(f"{_num(total + increment)}+{_num(increment)}x{steps - 1}")
                total += increment * steps
        else:
            present = False
            for level, steps in segments:
                value = self.fn(level)
                # promtool: "_xN" is N missing samples, "a+0xN" is N+1 samples. A series that goes away
                # gets a staleness marker first, as Prometheus writes when a target or series vanishes;
                # without it the last sample would stay visible for the 5m lookback.
                if value is None and present:
                    parts.append("stale" if steps == 1 else f"stale _x{steps - 1}")
                elif value is None:
                    parts.append(f"_x{steps}")
                else:
                    parts.append(f"{_num(value)}+0x{steps - 1}")
                present = value is not None
        return " ".join(parts)

    def input_series(self, segments: Segments) -> dict[str, str]:
        return {"series": _series_text(self.labels), "values": self.values(segments)}


@dataclass
class Signal:
    """How an alert's expression sees a level, and what the alert then looks like."""

    alert: str
    config: str
    metrics: list[Metric]
    above: float  # sustained: fires
    normal: float  # healthy
    below: float | None = None  # just short of the threshold: silent (None: no such level)
    rate: bool = False  # expression is over a rate window (first value one step late)
    window: int = 5  # minutes of that rate window
    hold: int = 0  # minutes the expression stays true after recovery (max_over_time windows)
    spike_immune: bool = True
    value: Callable[[float], float] = field(default=lambda level: level)  # $value at a level
    variant: str = ""  # words added to case names ("from DCGM")


def _minutes(duration: str) -> int:
    return math.ceil(seconds(duration) / 60)


def _test(name: str, segments: Segments, metrics: list[Metric], checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "interval": "1m",
        "input_series": [metric.input_series(segments) for metric in metrics],
        "alert_rule_test": checks,
    }


def _check(alert: str, minute: int, expected: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": expected or []}


def threshold_cases(signal: Signal, expect: Expected) -> list[dict]:
    """The standard cases for one threshold alert."""
    config = expect.settings[signal.config]
    for_min = _minutes(str(config["for"]))
    alert = signal.alert
    onset = 1 if signal.rate else 0  # first evaluation at which the expression has a value
    expected = [expect(alert, signal.value(signal.above))]
    variant = f" {signal.variant}" if signal.variant else ""
    cases = []

    checks = [_check(alert, onset + for_min, expected), _check(alert, onset + for_min + 2, expected)]
    if for_min > 0:
        checks.insert(0, _check(alert, onset + for_min - 1))
    cases.append(
        _test(
            f"{alert}{variant} fires {config['for']} after crossing its threshold, with exact labels, "
            f"and not a minute earlier",
            [(signal.above, onset + for_min + 3)],
            signal.metrics,
            checks,
        )
    )

    quiet_level = signal.below if signal.below is not None else signal.normal
    quiet_words = "just short of its threshold" if signal.below is not None else "while healthy"
    cases.append(
        _test(
            f"{alert}{variant} stays silent {quiet_words}",
            [(quiet_level, onset + for_min + 12)],
            signal.metrics,
            [_check(alert, onset + for_min), _check(alert, onset + for_min + 10)],
        )
    )

    if signal.spike_immune and for_min > 0:
        spike = 1 if signal.rate else max(1, for_min - (signal.hold + 2 if signal.hold else 0))
        if spike + (signal.hold + 1 if signal.hold else 0) <= for_min or signal.rate:
            start = 10
            cases.append(
                _test(
                    f"{alert}{variant} ignores a {spike}m spike past its threshold",
                    [(signal.normal, start), (signal.above, spike), (signal.normal, 15 + signal.hold)],
                    signal.metrics,
                    [_check(alert, minute) for minute in range(start, start + spike + signal.hold + 8)],
                )
            )

    bad = onset + for_min + 2
    clear = bad + (signal.window if signal.rate else 0) + signal.hold + 3
    cases.append(
        _test(
            f"{alert}{variant} resolves once the signal recovers",
            [(signal.above, bad), (signal.normal, clear - bad + 3)],
            signal.metrics,
            [_check(alert, onset + for_min + 1, expected), _check(alert, clear)],
        )
    )
    return cases


# ---- signals per family ---------------------------------------------------------------------------


def _error_signal(alerts: Mapping[str, Any]) -> Signal:
    threshold = float(alerts["errorRate"]["threshold"])
    base = {**SCRAPE, "__name__": "api_requests_total", "endpoint": "/v1/completions"}
    return Signal(
        alert="SLMHighErrorRate",
        config="errorRate",
        rate=True,
        metrics=[
            Metric({**base, "status": "200"}, lambda r: REQUESTS_PER_MINUTE * (1 - r), counter=True),
            Metric({**base, "status": "500"}, lambda r: REQUESTS_PER_MINUTE * r, counter=True),
            # Scrapes and probes are not traffic: were they counted, they would dilute the ratio
            # below the threshold and the "fires" case would fail.
            Metric(
                {**SCRAPE, "__name__": "api_requests_total", "endpoint": "/metrics", "status": "200"},
                lambda r: 20 * REQUESTS_PER_MINUTE,
                counter=True,
            ),
        ],
        window=_minutes(str(alerts["errorRate"]["window"])),
        above=min(1.0, threshold * 1.2),
        below=threshold * 0.8,
        normal=0.0,
    )


def _histogram_metrics(name: str, extra: Mapping[str, str], threshold: float) -> Callable[[], list[Metric]]:
    """Bucket counters whose 5m p95 (histogram_quantile) equals the level, for levels in (0, 3T)."""
    bounds = [0.5 * threshold, threshold, 1.5 * threshold, 3 * threshold]

    def fractions(level: float) -> list[float]:
        # Put the rest in the first bucket and a share b in the bucket holding `level` so that
        # linear interpolation at rank 0.95 lands exactly on `level`.
        lower = 0.0
        for index, upper in enumerate(bounds):
            if level <= upper:
                position = (level - lower) / (upper - lower)
                share = 0.05 / (1 - position)
                result = [0.0] * len(bounds)
                result[index] += share
                result[0] += 1 - share
                return result
            lower = upper
        raise ValueError(level)

    def build() -> list[Metric]:
        metrics = []
        for index, upper in enumerate([*bounds, math.inf]):
            le = "+Inf" if upper == math.inf else _num(upper)

            def cumulative(level: float, index: int = index) -> float:
                return REQUESTS_PER_MINUTE * sum(fractions(level)[: index + 1])

            metrics.append(Metric({**SCRAPE, **extra, "__name__": f"{name}_bucket", "le": le}, cumulative, True))
        return metrics

    return build


def _latency_signals(alerts: Mapping[str, Any]) -> list[Signal]:
    signals = []
    for alert, config, metric, extra in (
        ("SLMSlowResponseTime", "latencyP95", "api_request_duration_seconds", {"endpoint": "/v1/completions"}),
        ("SLMHighTimeToFirstToken", "timeToFirstToken", "slm_time_to_first_token_seconds", {"model": MODEL}),
    ):
        threshold = float(alerts[config]["thresholdSeconds"])
        signals.append(
            Signal(
                alert=alert,
                config=config,
                rate=True,
                metrics=_histogram_metrics(metric, extra, threshold)(),
                above=1.25 * threshold,
                below=0.975 * threshold,
                normal=0.475 * threshold,
            )
        )
    return signals


def _gauge(labels: Mapping[str, str], fn: Callable[[float], float | None]) -> Metric:
    return Metric(dict(labels), fn)


def _gpu_signals(alerts: Mapping[str, Any]) -> list[Signal]:
    util_t = float(alerts["gpuUtilization"]["thresholdPercent"])
    mem_t = float(alerts["gpuMemory"]["thresholdPercent"])
    up = _gauge({**SCRAPE, "__name__": "up"}, lambda level: 1)
    pynvml = {**SCRAPE, "index": "0", "uuid": "GPU-5f2a"}
    return [
        Signal(
            alert="SLMHighGPUUtilization",
            config="gpuUtilization",
            variant="(from DCGM)",
            metrics=[_gauge({**DCGM, "__name__": "DCGM_FI_DEV_GPU_UTIL"}, lambda level: level), up],
            above=util_t + 1,
            below=util_t - 1,
            normal=20,
        ),
        Signal(
            alert="SLMHighGPUUtilization",
            config="gpuUtilization",
            variant="(from pynvml)",
            metrics=[_gauge({**pynvml, "__name__": "nvidia_gpu_utilization"}, lambda level: level), up],
            above=util_t + 1,
            below=util_t - 1,
            normal=20,
        ),
        Signal(
            alert="SLMHighGPUMemory",
            config="gpuMemory",
            variant="(from DCGM)",
            metrics=[
                _gauge({**DCGM, "__name__": "DCGM_FI_DEV_FB_USED"}, lambda level: level * 800),
                _gauge({**DCGM, "__name__": "DCGM_FI_DEV_FB_FREE"}, lambda level: (100 - level) * 800),
                up,
            ],
            above=mem_t + 1,
            below=mem_t - 1,
            normal=40,
        ),
        Signal(
            alert="SLMHighGPUMemory",
            config="gpuMemory",
            variant="(from pynvml)",
            metrics=[
                _gauge({**pynvml, "__name__": "nvidia_gpu_memory_used_bytes"}, lambda level: level * 2**28),
                _gauge({**pynvml, "__name__": "nvidia_gpu_memory_total_bytes"}, lambda level: 100 * 2**28),
                up,
            ],
            above=mem_t + 1,
            below=mem_t - 1,
            normal=40,
        ),
        Signal(
            alert="SLMGPUXidErrors",
            config="gpuXidErrors",
            metrics=[_gauge({**DCGM, "__name__": "DCGM_FI_DEV_XID_ERRORS"}, lambda level: level), up],
            above=79,  # XID 79: GPU has fallen off the bus
            normal=0,
            hold=5,
            spike_immune=False,  # one XID is reason enough; see rules.yaml
        ),
    ]


def _capacity_signals(alerts: Mapping[str, Any]) -> list[Signal]:
    queue_t = float(alerts["queueSaturation"]["thresholdPercent"])
    disk = alerts["diskSpace"]
    disk_t = float(disk["minFreePercent"])
    mount = {**SCRAPE, "mountpoint": str(disk["mountpoint"])}
    model = {**SCRAPE, "model": MODEL}
    return [
        Signal(
            alert="SLMQueueSaturated",
            config="queueSaturation",
            metrics=[
                _gauge({**model, "__name__": "slm_requests_queued"}, lambda level: level),
                _gauge({**model, "__name__": "slm_max_queue"}, lambda level: 100),
            ],
            above=queue_t + 1,
            below=queue_t - 1,
            normal=0,
        ),
        Signal(
            alert="SLMLowDiskSpace",
            config="diskSpace",
            metrics=[
                _gauge({**mount, "__name__": "slm_filesystem_avail_bytes"}, lambda level: level * 10 * 2**30),
                _gauge({**mount, "__name__": "slm_filesystem_size_bytes"}, lambda level: 1000 * 2**30),
                # Another filesystem of the pod, nearly full all along: not the configured mountpoint.
                _gauge({**SCRAPE, "mountpoint": "/tmp", "__name__": "slm_filesystem_avail_bytes"}, lambda _: 1),
                _gauge({**SCRAPE, "mountpoint": "/tmp", "__name__": "slm_filesystem_size_bytes"}, lambda _: 100),
            ],
            above=disk_t - 1,
            below=disk_t + 1,
            normal=60,
        ),
    ]


def _availability_signals(alerts: Mapping[str, Any]) -> list[Signal]:
    other = {**KSM, "pod": OTHER_POD}
    return [
        Signal(
            alert="SLMTargetDown",
            config="targetDown",
            metrics=[_gauge({**SCRAPE, "__name__": "up"}, lambda level: level)],
            above=0,
            normal=1,
        ),
        Signal(
            alert="SLMPodCrashLooping",
            config="podCrashLooping",
            metrics=[
                _gauge(
                    {
                        **KSM,
                        "pod": POD,
                        "container": "server",
                        "reason": "CrashLoopBackOff",
                        "__name__": "kube_pod_container_status_waiting_reason",
                    },
                    lambda level: level,
                ),
                # The pod of deployment "phi-mini" crash-loops all along; it is not phi's.
                _gauge(
                    {
                        **other,
                        "container": "server",
                        "reason": "CrashLoopBackOff",
                        "__name__": "kube_pod_container_status_waiting_reason",
                    },
                    lambda _: 1,
                ),
            ],
            above=1,
            normal=0,
            hold=5,
        ),
        Signal(
            alert="SLMPodNotReady",
            config="podNotReady",
            metrics=[
                _gauge(
                    {**KSM, "pod": POD, "condition": "false", "__name__": "kube_pod_status_ready"}, lambda level: level
                ),
                _gauge(
                    {**KSM, "pod": POD, "condition": "true", "__name__": "kube_pod_status_ready"},
                    lambda level: 1 - level,
                ),
                _gauge({**other, "condition": "false", "__name__": "kube_pod_status_ready"}, lambda _: 1),
            ],
            above=1,
            normal=0,
        ),
        Signal(
            alert="SLMScrapeTargetMissing",
            config="scrapeTargetMissing",
            metrics=[
                # kube-state-metrics: the Deployment "phi" has 2 ready pods all along.
                _gauge({**KSM, "deployment": NAME, "__name__": "kube_deployment_status_replicas_ready"}, lambda _: 2),
                # Level 1: Prometheus has no target for phi (no up series at all); 0: it scrapes one.
                _gauge({**SCRAPE, "__name__": "up"}, lambda level: None if level else 1),
                # Another deployment's target in the same namespace is no target of phi's.
                _gauge({**SCRAPE, "job": "phi-mini", "pod": OTHER_POD, "__name__": "up"}, lambda _: 1),
            ],
            above=1,
            normal=0,
            value=lambda _: 2,
        ),
    ]


def _target_missing_cases(expect: Expected) -> list[dict]:
    alert = "SLMScrapeTargetMissing"
    for_min = _minutes(str(expect.settings["scrapeTargetMissing"]["for"]))
    steps = for_min + 5
    ready = {**KSM, "deployment": NAME, "__name__": "kube_deployment_status_replicas_ready"}
    return [
        _test(
            f"{alert} stays silent while the Deployment has no ready pod",
            [(0, steps)],
            [_gauge(ready, lambda _: 0)],
            [_check(alert, for_min + 1)],
        ),
        _test(
            f"{alert} stays silent while the target exists but is down (SLMTargetDown's case)",
            [(0, steps)],
            [_gauge(ready, lambda _: 2), _gauge({**SCRAPE, "__name__": "up"}, lambda _: 0)],
            [_check(alert, for_min + 1)],
        ),
    ]


def _fault_signals() -> list[Signal]:
    return [
        Signal(
            alert="SLMFaultInjectionEnabled",
            config="faultInjectionEnabled",
            metrics=[
                _gauge({**SCRAPE, "model": MODEL, "__name__": "slm_fault_injection_enabled"}, lambda level: level),
                # Another deployment with faults on is not this one's.
                _gauge(
                    {
                        **SCRAPE,
                        "job": "phi-mini",
                        "pod": OTHER_POD,
                        "model": MODEL,
                        "__name__": "slm_fault_injection_enabled",
                    },
                    lambda _: 1,
                ),
            ],
            above=1,
            normal=0,
        )
    ]


def _gpu_absent_cases(expect: Expected) -> list[dict]:
    alert = "SLMGPUMetricsAbsent"
    for_min = _minutes(str(expect.settings["gpuMetricsAbsent"]["for"]))
    info = {**SCRAPE, "__name__": "slm_model_info", "model": MODEL, "revision": "main", "dtype": "float16"}
    cuda = _gauge({**info, "device": "cuda:0"}, lambda _: 1)
    up = _gauge({**SCRAPE, "__name__": "up"}, lambda _: 1)
    expected = [expect(alert, 1)]
    steps = for_min + 12
    dcgm_late = _gauge({**DCGM, "__name__": "DCGM_FI_DEV_GPU_UTIL"}, lambda level: None if level else 30)
    checks_before = [_check(alert, for_min - 1)] if for_min else []
    return [
        _test(
            f"{alert} fires {for_min}m after a CUDA model shows no GPU series, and not a minute earlier",
            [(0, steps)],
            [cuda, up],
            [*checks_before, _check(alert, for_min, expected)],
        ),
        _test(
            f"{alert} stays silent while pynvml reports the GPU",
            [(0, steps)],
            [
                cuda,
                up,
                _gauge(
                    {**SCRAPE, "index": "0", "uuid": "GPU-5f2a", "__name__": "nvidia_gpu_utilization"}, lambda _: 30
                ),
            ],
            [_check(alert, for_min + 1), _check(alert, for_min + 10)],
        ),
        _test(
            f"{alert} stays silent while DCGM reports the GPU",
            [(0, steps)],
            [cuda, up, _gauge({**DCGM, "__name__": "DCGM_FI_DEV_GPU_UTIL"}, lambda _: 30)],
            [_check(alert, for_min + 1), _check(alert, for_min + 10)],
        ),
        _test(
            f"{alert} stays silent for a model on the CPU",
            [(0, steps)],
            [_gauge({**info, "device": "cpu"}, lambda _: 1), up],
            [_check(alert, for_min + 1), _check(alert, for_min + 10)],
        ),
        _test(
            f"{alert} resolves once DCGM series appear",
            [(1, for_min + 2), (0, 10)],
            [cuda, up, dcgm_late],
            [_check(alert, for_min + 1, expected), _check(alert, for_min + 4)],
        ),
    ]


def _gpu_extra_cases(expect: Expected) -> list[dict]:
    alert = "SLMHighGPUUtilization"
    threshold = float(expect.settings["gpuUtilization"]["thresholdPercent"])
    for_min = _minutes(str(expect.settings["gpuUtilization"]["for"]))
    up = _gauge({**SCRAPE, "__name__": "up"}, lambda _: 1)
    other_up = _gauge({**SCRAPE, "job": "phi-mini", "pod": OTHER_POD, "__name__": "up"}, lambda _: 1)
    return [
        _test(
            f"{alert} reads DCGM first: a busy GPU by DCGM fires although pynvml reads it idle",
            [(0, for_min + 3)],
            [
                up,
                _gauge({**DCGM, "__name__": "DCGM_FI_DEV_GPU_UTIL"}, lambda _: threshold + 5),
                _gauge({**SCRAPE, "index": "0", "uuid": "GPU-5f2a", "__name__": "nvidia_gpu_utilization"}, lambda _: 0),
            ],
            [_check(alert, for_min + 1, [expect(alert, threshold + 5)])],
        ),
        _test(
            f"{alert} ignores the busy GPU of another deployment's pod",
            [(0, for_min + 3)],
            [up, other_up, _gauge({**DCGM, "pod": OTHER_POD, "__name__": "DCGM_FI_DEV_GPU_UTIL"}, lambda _: 100)],
            [_check(alert, for_min + 1)],
        ),
        {
            **_test(
                f"{alert} fires once for a GPU that DCGM (host index 3) and pynvml (index 0) both report",
                [(0, for_min + 3)],
                [
                    up,
                    _gauge({**DCGM, "gpu": "3", "__name__": "DCGM_FI_DEV_GPU_UTIL"}, lambda _: threshold + 5),
                    _gauge(
                        {**SCRAPE, "index": "0", "uuid": "GPU-5f2a", "__name__": "nvidia_gpu_utilization"},
                        lambda _: threshold + 5,
                    ),
                ],
                [_check(alert, for_min + 1, [expect(f"{alert} on GPU 3", threshold + 5)])],
            ),
            # The panels read the same recorded series: one sample, DCGM's.
            "promql_expr_test": [
                {
                    "expr": f'slm:gpu_utilization:percent{{namespace="{NAMESPACE}",job="{NAME}"}}',
                    "eval_time": f"{for_min + 1}m",
                    "exp_samples": [
                        {
                            "labels": f'slm:gpu_utilization:percent{{gpu="3",job="{NAME}",namespace="{NAMESPACE}",'
                            f'pod="{POD}"}}',
                            "value": threshold + 5,
                        }
                    ],
                }
            ],
        },
    ]


# ---- burn rates -----------------------------------------------------------------------------------


def _window_ratio(segments: Segments, minute: int, window_s: float) -> float:
    """Error ratio over (minute - window, minute] as Prometheus 3 computes it from one-minute samples."""
    increments: list[float] = []
    for level, steps in segments:
        increments.extend([level] * steps)
    # Sample i (at minute i) follows increment i-1; samples in the left-open window count.
    first = max(0, math.floor(minute - window_s / 60) + 1)
    used = increments[first:minute]
    return sum(used) / len(used)


def _burn_cases(expect: Expected) -> list[dict]:
    slo = expect.settings["slo"]
    budget = 1 - float(slo["availabilityPercent"]) / 100
    burns = expect.burn_rates
    fast = [b for b in burns if b["alert"] == "SLMErrorBudgetBurnFast"]
    slow = [b for b in burns if b["alert"] == "SLMErrorBudgetBurnSlow"]
    base = {**SCRAPE, "__name__": "api_requests_total", "endpoint": "/v1/chat/completions"}
    metrics = [
        Metric({**base, "status": "200"}, lambda r: REQUESTS_PER_MINUTE * (1 - r), counter=True),
        Metric({**base, "status": "503"}, lambda r: REQUESTS_PER_MINUTE * r, counter=True),
    ]

    def expect_burn(burn: Mapping[str, Any], value: float) -> dict[str, Any]:
        # One alert name for two rules: the long window tells them apart.
        return expect(f"{burn['alert']} {burn['long']}", value)

    page, page_slow = fast[0], fast[1]
    ticket, ticket_slow = slow[0], slow[1]
    cases = []

    healthy = _minutes(page["long"]) + 5
    outage = 3
    segments: Segments = [(0.0, healthy), (1.0, outage), (0.0, 60)]
    firing = _simulate_burn(segments, burns, budget)
    assert any(b is page for b, _ in firing[healthy + 2]), "the page would come later than 2 minutes"

    def expected_at(minute: int, alert: str) -> list[dict[str, Any]]:
        return [expect_burn(b, v) for b, v in firing[minute] if b["alert"] == alert]

    # Silent before, the page 2 minutes in, then the minute each other rule first fires (if it does).
    first_firing = [next((m for m, now in enumerate(firing) if any(b is burn for b, _ in now)), None) for burn in burns]
    minutes = sorted({healthy, healthy + 1, healthy + 2, *(m for m in first_firing if m is not None)})
    checks = [
        _check(alert, minute, expected_at(minute, alert))
        for minute in minutes
        for alert in ("SLMErrorBudgetBurnFast", "SLMErrorBudgetBurnSlow")
    ]
    cases.append(
        _test(
            f"SLMErrorBudgetBurnFast pages within 2 minutes of a {outage}-minute total outage, and each burn rule "
            f"fires once its windows and `for` see the outage",
            segments,
            metrics,
            checks,
        )
    )

    long_run = _minutes(ticket_slow["for"]) + 30
    cases.append(
        _test(
            "Neither burn-rate alert fires at half the burn rate the SLO allows",
            [(0.5 * budget, long_run)],
            metrics,
            [
                check
                for minute in range(30, long_run, 30)
                for check in (_check("SLMErrorBudgetBurnFast", minute), _check("SLMErrorBudgetBurnSlow", minute))
            ],
        )
    )

    # (rule, sustained error ratio, whether the page must stay silent meanwhile)
    for burn, level, page_silent in (
        (page, 15 * budget, False),
        (page_slow, 7 * budget, False),
        (ticket, 3.5 * budget, True),
        (ticket_slow, 1.5 * budget, True),
    ):
        for_min = _minutes(burn["for"])
        fires_at = 1 + for_min
        checks = [_check(burn["alert"], fires_at, [expect_burn(burn, level)])]
        if for_min:
            checks.insert(0, _check(burn["alert"], fires_at - 1))
        if page_silent:
            checks.append(_check("SLMErrorBudgetBurnFast", fires_at))
        cases.append(
            _test(
                f"{burn['alert']} fires {burn['for']} after a sustained {level / budget:g}x burn "
                f"({burn['long']}/{burn['short']} windows)",
                [(level, fires_at + 3)],
                metrics,
                checks,
            )
        )

    # The burst is judged against the history the windows hold: pick the shortest healthy history
    # (whole hours) after which the simulation says no rule would even turn pending, then prove it.
    longest = max(_minutes(b["long"]) for b in burns)
    history = 60
    while history < longest + 10:
        trial = _simulate_burn([(0.0, history), (0.5, 1), (0.0, 60)], burns, budget, pending=True)
        if not any(trial):
            break
        history += 60
    cases.append(
        _test(
            "A one-minute burst of 50% errors after a healthy history neither pages nor opens a ticket",
            [(0.0, history), (0.5, 1), (0.0, 60)],
            metrics,
            [
                check
                for minute in range(history, history + 60, 3)
                for check in (_check("SLMErrorBudgetBurnFast", minute), _check("SLMErrorBudgetBurnSlow", minute))
            ],
        )
    )
    return cases


def _simulate_burn(
    segments: Segments, burns: list[dict[str, Any]], budget: float, *, pending: bool = False
) -> list[list[tuple[dict[str, Any], float]]]:
    """Per minute, the burn rules firing (with $value) as Prometheus evaluates them every minute.

    With pending=True, rules whose condition holds count even before `for` elapses.
    """
    minutes = sum(steps for _, steps in segments)
    active_since: dict[int, int | None] = dict.fromkeys(range(len(burns)))
    firing: list[list[tuple[dict[str, Any], float]]] = []
    for minute in range(minutes + 1):
        now: list[tuple[dict[str, Any], float]] = []
        for index, burn in enumerate(burns):
            limit = float(burn["factor"]) * budget
            if minute == 0:
                active = False
            else:
                long_ratio = _window_ratio(segments, minute, seconds(burn["long"]))
                short_ratio = _window_ratio(segments, minute, seconds(burn["short"]))
                if pending:  # searching: a ratio on the threshold counts as active
                    active = long_ratio >= limit and short_ratio >= limit
                else:
                    for ratio in (long_ratio, short_ratio):
                        assert abs(ratio - limit) > 1e-9, "a ratio sits on the threshold: ambiguous case"
                    active = long_ratio > limit and short_ratio > limit
            if not active:
                active_since[index] = None
                continue
            since = active_since[index]
            if since is None:
                since = active_since[index] = minute
            if pending or (minute - since) * 60 >= seconds(burn["for"]):
                now.append((burn, long_ratio))
        firing.append(now)
    return firing


# ---- drift ----------------------------------------------------------------------------------------


def _simulate_zscores(
    segments: Segments, settings: Mapping[str, Any], *, floor_ratio: float, floor_abs: float
) -> list[float | None]:
    """z-score of the drift rules at each minute, as Prometheus 3 evaluates them (1m steps)."""
    levels: list[float] = []
    for level, steps in segments:
        levels.extend([level] * steps)
    window = round(seconds(settings["window"]) / 60)
    baseline = round(seconds(settings["baseline"]) / 60)
    means: list[float | None] = [None]
    for minute in range(1, len(levels) + 1):
        first = max(0, minute - window + 1)
        used = levels[first:minute]  # every increment carries the same count, so the mean is plain
        means.append(sum(used) / len(used))
    z: list[float | None] = []
    for minute in range(len(means)):
        history = [m for m in means[max(0, minute - baseline + 1) : minute + 1] if m is not None]
        mean = means[minute]
        if mean is None or len(history) < settings["min_samples"]:
            z.append(None)
            continue
        avg = sum(history) / len(history)
        sd = math.sqrt(sum((m - avg) ** 2 for m in history) / len(history))
        floor = floor_ratio * abs(avg)
        scale = max(floor_abs, sd if sd > floor else floor)
        z.append((mean - avg) / scale)
    return z


def _drift_cases(expect: Expected, signal: str) -> list[dict]:
    settings = expect.drift[signal]
    alert = settings["alert"]
    config = expect.settings[settings["config"]]
    assert settings["interval"] == "1m", "drift cases simulate one-minute evaluations"
    threshold = float(config["zScore"])
    for_min = _minutes(str(config["for"]))
    if signal == "perplexity":
        labels = {**SCRAPE, "model": MODEL}
        name = "slm_request_perplexity"
        base_level, shifted = 12.0, 24.0
    else:
        labels = {**SCRAPE, "endpoint": "/v1/completions"}
        name = "model_output_tokens"
        base_level, shifted = 64.0, 16.0
    # Output length increments come as whole tokens in a real server; per-minute sums here are exact.
    metrics = [
        Metric({**labels, "__name__": f"{name}_count"}, lambda _: 100, counter=True),
        Metric({**labels, "__name__": f"{name}_sum"}, lambda level: 100 * level, counter=True),
        # A healthy second signal of another deployment must not leak into this one.
        Metric({**labels, "job": "phi-mini", "__name__": f"{name}_sum"}, lambda _: 1e6, counter=True),
    ]
    floor_ratio, floor_abs = DRIFT_FLOOR_RATIO, DRIFT_FLOOR_ABS
    history = settings["min_samples"] + round(seconds(settings["window"]) / 60) + 5

    def simulate(segments: Segments) -> list[float | None]:
        return _simulate_zscores(segments, settings, floor_ratio=floor_ratio, floor_abs=floor_abs)

    cases = []
    segments: Segments = [(base_level, history), (shifted, for_min + 40)]
    z = simulate(segments)
    onset = next(m for m in range(history, len(z)) if z[m] is not None and abs(z[m] or 0) > threshold)
    fire = onset + for_min
    for minute in (onset - 1, onset, fire):
        value = z[minute]
        assert value is not None and abs(abs(value) - threshold) > 1e-3, "level too close to threshold"
    value = abs(z[fire] or 0)
    checks = [_check(alert, fire, [expect(alert, value)])]
    if for_min:
        checks.insert(0, _check(alert, fire - 1))
    cases.append(
        _test(
            f"{alert} fires {config['for']} after the mean moves from {base_level:g} to {shifted:g}, "
            f"and not a minute earlier",
            segments,
            metrics,
            checks,
        )
    )

    steady = [(base_level, history + for_min + 60)]
    assert all(v is None or v == 0 for v in simulate(steady))
    cases.append(
        _test(
            f"{alert} never fires on perfectly constant traffic (zero variance)",
            steady,
            metrics,
            [_check(alert, minute) for minute in range(history, history + for_min + 60, 10)],
        )
    )

    young = settings["min_samples"] // 2
    cases.append(
        _test(
            f"{alert} stays silent on a big shift before {settings['min_samples']} evaluations of history",
            [(base_level, young), (shifted * 3, for_min + 10)],
            metrics,
            [_check(alert, young + for_min + 5)],
        )
    )

    spike_segments: Segments = [(base_level, history), (shifted, 1), (base_level, 40)]
    spike_z = simulate(spike_segments)
    assert all(v is None or abs(v) < threshold for v in spike_z), "the spike would fire"
    cases.append(
        _test(
            f"{alert} ignores a one-minute shift",
            spike_segments,
            metrics,
            [_check(alert, minute) for minute in range(history, history + 40, 2)],
        )
    )

    back = fire + 2
    resolve_segments: Segments = [(base_level, history), (shifted, back - history), (base_level, 60)]
    resolve_z = simulate(resolve_segments)
    resolved = next(m for m in range(back, len(resolve_z)) if abs(resolve_z[m] or 0) <= threshold) + 1
    cases.append(
        _test(
            f"{alert} resolves after the mean returns to its baseline",
            resolve_segments,
            metrics,
            [
                _check(alert, fire, [expect(alert, abs(resolve_z[fire] or 0))]),
                _check(alert, resolved + 1),
            ],
        )
    )
    return cases


# ---- assembly -------------------------------------------------------------------------------------


def _disabled_cases(expect: Expected) -> list[dict]:
    cases = []
    for alert in expect.settings["disabled"]:
        cases.append(
            _test(
                f"{alert} never fires because the resource disables it",
                [(0, 5)],
                [_gauge({**SCRAPE, "__name__": "up"}, lambda _: 0)],
                [_check(alert, 4)],
            )
        )
    return cases


def _threshold_family(signals: list[Signal], expect: Expected) -> list[dict]:
    disabled = set(expect.settings["disabled"])
    return [case for s in signals if s.alert not in disabled for case in threshold_cases(s, expect)]


def build_test_files(
    *, variant: str, groups: list[dict[str, Any]], rule_files: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """{family: promtool test document} for the rules rendered from variant `variant` of the resource.

    `groups` are the groups to test, read for their names only (which file holds which group, and the
    order to evaluate them in): the shared recording rules as the chart ships them first, then the
    deployment's PrometheusRule groups as the operator renders them; `rule_files` maps each group name to
    the file it was written to (one group per file). The drift families load the shared rules and their
    own group only, which keeps their long histories from re-evaluating the multi-day SLO windows at
    every step; every other family loads the shared rules and the alert group.
    """
    expect = Expected(variant)
    settings = expect.settings
    disabled = set(settings["disabled"])
    families: dict[str, list[dict]] = {
        "errors": _threshold_family([_error_signal(settings)], expect),
        "latency": _threshold_family(_latency_signals(settings), expect),
        "gpu": _threshold_family(_gpu_signals(settings), expect),
        "capacity": _threshold_family(_capacity_signals(settings), expect),
        "availability": _threshold_family(_availability_signals(settings), expect),
        "faults": _threshold_family(_fault_signals(), expect),
        "slo": _burn_cases(expect),
        "disabled": _disabled_cases(expect),
    }
    if "SLMGPUMetricsAbsent" not in disabled:
        families["gpu"] += _gpu_absent_cases(expect)
    if "SLMHighGPUUtilization" not in disabled:
        families["gpu"] += _gpu_extra_cases(expect)
    if "SLMScrapeTargetMissing" not in disabled:
        families["availability"] += _target_missing_cases(expect)
    for signal, drift in expect.drift.items():
        if drift["alert"] not in disabled:
            families[f"drift-{signal}"] = _drift_cases(expect, signal)
    # Recording groups first: promtool otherwise evaluates groups in random order, and an alert
    # evaluated before the recording rule it reads would lag one interval in some runs only.
    order = [group["name"] for group in groups]
    deployment = f"slm-{NAME}."
    shared = [name for name in order if not name.startswith(deployment)]
    main = [*shared, f"{deployment}alerts"]
    documents = {}
    for family, cases in families.items():
        if not cases:
            continue
        names = [*shared, f"{deployment}{family}"] if family.startswith("drift-") else main
        documents[family] = {
            "rule_files": [rule_files[name] for name in names],
            "evaluation_interval": "1m",
            "group_eval_order": [name for name in order if name in names],
            "tests": cases,
        }
    return documents
