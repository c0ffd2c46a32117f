"""Defaults of `spec.monitoring.alerts` — the one place they are written.

The CRD's schema defaults (manifests/crds/) must equal these; a unit test checks it. The first three
and the disk alert carry the thresholds the project started from (docs/architecture.md, "Default alert
thresholds"): HighErrorRate 5 % for 5m, SlowResponseTime p95 > 2 s for 5m, HighGPUUtilization > 90 %
for 15m, LowDiskSpace < 10 % on /data for 5m.

The alerts on signals only some runtimes have (KV-cache saturation, preemptions) keep their defaults beside
their rules, in data/rules.yaml `runtime_alerts`; ALERT_DEFAULTS takes them from there, so they are written
once too.
"""

from __future__ import annotations

import copy
from typing import Any

from slm_operator.monitoring import load_data

ALERT_DEFAULTS: dict[str, Any] = {
    # `window`: the rate window of the error ratio (5m by default); shorter reacts and recovers faster.
    # The window keeps a burst visible after it ends: the ratio stays above the threshold for about
    # burst + window - 1m, so with 5m a 2-minute burst already outlasts `for: 5m` (docs/runbooks/SLMHighErrorRate.md).
    "errorRate": {"threshold": 0.05, "for": "5m", "severity": "critical", "window": "5m"},
    "latencyP95": {"thresholdSeconds": 2.0, "for": "5m", "severity": "warning"},
    "gpuUtilization": {"thresholdPercent": 90, "for": "15m", "severity": "warning"},
    "gpuMemory": {"thresholdPercent": 95, "for": "10m", "severity": "warning"},
    "diskSpace": {"minFreePercent": 10, "mountpoint": "/data", "for": "5m", "severity": "warning"},
    "timeToFirstToken": {"thresholdSeconds": 1.0, "for": "5m", "severity": "warning"},
    "queueSaturation": {"thresholdPercent": 90, "for": "5m", "severity": "warning"},
    # Drift: z-score of the mean over `window` against its own history over `baselineWindow`.
    # z 4 for 3m: recall >= 0.9 within 15 minutes for drifts of 2 sigma and more, no false alarm in
    # model-weeks of stable traffic (bench/bench_drift.py, tests/drift; docs/anomaly-detection.md).
    "perplexityDrift": {
        "zScore": 4.0,
        "for": "3m",
        "severity": "warning",
        "window": "15m",
        "baselineWindow": "1d",
    },
    "outputLengthDrift": {
        "zScore": 4.0,
        "for": "3m",
        "severity": "warning",
        "window": "15m",
        "baselineWindow": "1d",
    },
    # Alerts beyond the original four; every `for` and severity is still the SRE's to edit.
    "gpuXidErrors": {"for": "1m", "severity": "critical"},
    "gpuMetricsAbsent": {"for": "10m", "severity": "warning"},
    "targetDown": {"for": "5m", "severity": "critical"},
    "podCrashLooping": {"for": "15m", "severity": "warning"},
    "podNotReady": {"for": "15m", "severity": "warning"},
    # Ready pods but no scrape target: every other alert of the deployment would be silently dead.
    "scrapeTargetMissing": {"for": "10m", "severity": "warning"},
    # Fault injection is a deliberate switch, never a transient state: `for` only rides out one scrape.
    "faultInjectionEnabled": {"for": "1m", "severity": "warning"},
    # Multi-window multi-burn-rate alerts (SRE workbook ch. 5); the burn windows scale with `window`.
    "slo": {
        "availabilityPercent": 99.9,
        "window": "30d",
        "pageSeverity": "critical",
        "ticketSeverity": "warning",
    },
    "disabled": [],
    "runbookBaseURL": "",
}

# KV-cache saturation and preemptions (vLLM, SGLang): `spec.monitoring.alerts.<config>` of each runtime alert.
ALERT_DEFAULTS.update({
    spec["config"]: dict(spec["defaults"]) for spec in load_data("rules.yaml")["runtime_alerts"]
})

SEVERITIES = ("critical", "warning", "info")


def merged_alerts(alerts: dict[str, Any] | None) -> dict[str, Any]:
    """`spec.monitoring.alerts` with every missing field taken from ALERT_DEFAULTS (deep, per key)."""
    result = copy.deepcopy(ALERT_DEFAULTS)
    for key, value in (alerts or {}).items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key].update(value)
        else:
            result[key] = copy.deepcopy(value)
    return result
