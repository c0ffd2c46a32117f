"""The operator's own Prometheus metrics, served on :9090/metrics (prometheus-client)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "slm_operator_reconciles_total",
    "Reconciles of SLMDeployments, by trigger (create, update, resume, resync, child, retry) and result (ok, error).",
    ["trigger", "result"],
)
RECONCILE_ERRORS = Counter(
    "slm_operator_reconcile_errors_total",
    "Reconciles that raised, by exception class.",
    ["error"],
)
RECONCILE_DURATION = Histogram(
    "slm_operator_reconcile_duration_seconds",
    "Wall time of one reconcile of one SLMDeployment.",
    ["trigger"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
API_WRITES = Counter(
    "slm_operator_api_writes_total",
    "Writes sent to the API server (apply, delete, status patch, event), by kind and verb.",
    ["kind", "verb"],
)
APPLY_SKIPPED = Counter(
    "slm_operator_apply_skipped_total",
    "Applies skipped because the live object already matched, by kind.",
    ["kind"],
)
MANAGED_RESOURCES = Gauge(
    "slm_operator_managed_resources",
    "Objects the operator currently owns, by kind (SLMDeployment counts the custom resources).",
    ["kind"],
)


def writes_total() -> float:
    """Sum of slm_operator_api_writes_total over all labels (tests and the benchmark read it)."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "slm_operator_api_writes"
        for sample in metric.samples
        if sample.name == "slm_operator_api_writes_total"
    )


def reconciles_total() -> float:
    return sum(s.value for m in RECONCILES.collect() for s in m.samples if s.name.endswith("_total"))


def serve(port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> None:  # noqa: S104
    """Expose /metrics (the chart's Service and ServiceMonitor scrape it)."""
    start_http_server(port, addr=host, registry=registry)
