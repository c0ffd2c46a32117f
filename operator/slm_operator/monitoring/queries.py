"""The PromQL of every dashboard panel, one function per query (owned by the monitoring work).

Queries are scoped by the same selectors as the rules (slm_operator.monitoring.rules.selectors) and read
the shared recording rules' series (slm:<what>:<window>) wherever an alert reads the same thing, or the
alert's very expression (the error ratio over a resource's window), so a panel and its alert can never
disagree. Panel layout, legends and units live in slm_operator.monitoring.dashboards.
Grafana substitutes `$model`, `$namespace` and `$__rate_interval` before the query reaches Prometheus.
"""

from __future__ import annotations

import dataclasses

from slm_operator.monitoring.rules import error_ratio_expr, selectors

RATE = "$__rate_interval"


@dataclasses.dataclass(frozen=True)
class Scope:
    """The label matchers of one SLMDeployment's series.

    `sel`: every series the server exposes; `req`: user traffic only (probes and scrapes left out);
    `pods`: kube-state-metrics' series of its pods; `model`: `sel` narrowed to the dashboard's
    `model` variable.
    """

    sel: str
    req: str
    pods: str
    model: str

    @classmethod
    def of(cls, *, name: str, namespace: str) -> Scope:
        base = selectors(name=name, namespace=namespace)
        return cls(sel=base["sel"], req=base["req"], pods=base["pods"], model=f'{base["sel"]},model=~"$model"')


def _quantile(q: float, buckets: str, selector: str, window: str) -> str:
    """histogram_quantile over the raw _bucket counter `buckets` rated over `window`."""
    return f"histogram_quantile({q:.2f}, sum by (le) (rate({buckets}{{{selector}}}[{window}])))"


# ---- traffic and errors -----------------------------------------------------------------------------


def request_rate_by_endpoint(s: Scope) -> str:
    return f"sum by (endpoint) (slm:requests:rate5m{{{s.sel}}})"


def error_ratio_by_endpoint(s: Scope) -> str:
    # `or ... * 0`: an endpoint without a 5xx yet reads 0, not "No data".
    return (
        f'(sum by (endpoint) (slm:requests:rate5m{{{s.sel},status=~"5.."}})'
        f" or sum by (endpoint) (slm:requests:rate5m{{{s.sel}}}) * 0)"
        f" / sum by (endpoint) (slm:requests:rate5m{{{s.sel}}})"
    )


def error_ratio(s: Scope, window: str) -> str:
    """The error ratio over `window` exactly as SLMHighErrorRate and the burn-rate alerts compute it."""
    return " ".join(error_ratio_expr(s.sel, window).split())


def response_time_p95(s: Scope) -> str:
    return f"slm:request_duration_seconds_p95:rate5m{{{s.sel}}}"


def response_time_p50(s: Scope) -> str:
    return f"slm:request_duration_seconds_p50:rate5m{{{s.sel}}}"


# The quantiles the shared rules record per endpoint (they record quantiles, not bucket rates).
_BY_ENDPOINT = {0.95: "slm:request_duration_seconds_p95_by_endpoint:rate5m",
                0.50: "slm:request_duration_seconds_p50_by_endpoint:rate5m"}  # fmt: skip


def response_time_by_endpoint(s: Scope, q: float) -> str:
    if q not in _BY_ENDPOINT:
        raise ValueError(f"the shared rules record the p95 and p50 per endpoint, not the {q:g} quantile")
    return f"{_BY_ENDPOINT[q]}{{{s.sel}}}"


def budget_burn_rate(s: Scope, window: str, budget: float) -> str:
    return f"({error_ratio(s, window)}) / {budget:g}"


def model_info(s: Scope) -> str:
    return f"slm_model_info{{{s.model}}}"


# ---- generation ---------------------------------------------------------------------------------------


def time_to_first_token_p95(s: Scope) -> str:
    return f"slm:time_to_first_token_seconds_p95:rate5m{{{s.model}}}"


def time_to_first_token_p50(s: Scope) -> str:
    return f"slm:time_to_first_token_seconds_p50:rate5m{{{s.model}}}"


def inter_token_latency(s: Scope, q: float) -> str:
    return _quantile(q, "slm_inter_token_latency_seconds_bucket", s.model, RATE)


def generated_tokens_rate(s: Scope) -> str:
    return f"sum(rate(slm_generation_tokens_total{{{s.model}}}[{RATE}]))"


def prompt_tokens_rate(s: Scope) -> str:
    return f"sum(rate(slm_prompt_tokens_total{{{s.model}}}[{RATE}]))"


def prefix_cache_hits_rate(s: Scope) -> str:
    return f"sum(rate(slm_prefix_cache_hits_total{{{s.model}}}[{RATE}]))"


def request_tokens_per_second(s: Scope, q: float) -> str:
    return _quantile(q, "slm_request_tokens_per_second_bucket", s.model, RATE)


def requests_in_flight(s: Scope) -> str:
    return f"sum(slm_requests_in_flight{{{s.model}}})"


def requests_queued(s: Scope) -> str:
    return f"sum(slm_requests_queued{{{s.model}}})"


def concurrency_limit(s: Scope) -> str:
    return f"sum(slm_max_concurrent_requests{{{s.model}}})"


def queue_limit(s: Scope) -> str:
    return f"sum(slm_max_queue{{{s.model}}})"


def mean_batch_size(s: Scope) -> str:
    return (
        f"sum(rate(slm_forward_pass_generations_total{{{s.model}}}[{RATE}]))"
        f" / sum(rate(slm_forward_passes_total{{{s.model}}}[{RATE}]))"
    )


def queue_utilization(s: Scope) -> str:
    return f"slm:queue_utilization:percent{{{s.model}}}"


def finish_reasons(s: Scope) -> str:
    return f"sum by (finish_reason) (rate(slm_request_finish_total{{{s.model}}}[{RATE}]))"


def empty_outputs_rate(s: Scope) -> str:
    return f"sum(rate(slm_empty_outputs_total{{{s.model}}}[{RATE}]))"


def repetitive_outputs_rate(s: Scope) -> str:
    return f"sum(rate(slm_repetitive_outputs_total{{{s.model}}}[{RATE}]))"


def incomplete_structured_outputs_rate(s: Scope) -> str:
    return f'sum(rate(slm_structured_outputs_total{{{s.model},result="incomplete"}}[{RATE}]))'


def kv_cache_bytes(s: Scope) -> str:
    return f"sum(slm_kv_cache_bytes{{{s.model}}})"


def kv_cache_padding_bytes(s: Scope) -> str:
    """The KV cache bytes spent on left-padding: the cache times the padding's share of its positions."""
    return (
        f"sum(slm_kv_cache_bytes{{{s.model}}})"
        f' * sum(slm_kv_cache_positions{{{s.model},kind="padding"}})'
        f" / clamp_min(sum(slm_kv_cache_positions{{{s.model}}}), 1)"
    )


def prefix_cache_bytes(s: Scope) -> str:
    return f"sum(slm_prefix_cache_bytes{{{s.model}}})"


def prefix_cache_capacity_bytes(s: Scope) -> str:
    return f"sum(slm_prefix_cache_capacity_bytes{{{s.model}}})"


# ---- model behaviour ------------------------------------------------------------------------------------


def drift_series(series: str, s: Scope, *, per_model: bool) -> str:
    """A drift rule's recorded series (its name from rules.drift_series); output length has no model label."""
    return f"{series}{{{s.model if per_model else s.sel}}}"


def perplexity_quantile(s: Scope, q: float) -> str:
    return _quantile(q, "slm_request_perplexity_bucket", s.model, RATE)


def output_tokens_quantile(s: Scope, q: float) -> str:
    return _quantile(q, "model_output_tokens_bucket", s.req, RATE)


def output_tokens_heatmap(s: Scope) -> str:
    return f"sum by (le) (rate(model_output_tokens_bucket{{{s.req}}}[{RATE}]))"


def server_drift_score(s: Scope) -> str:
    return f"slm_drift_score{{{s.model}}}"


def server_drift_detected(s: Scope) -> str:
    return f"slm_drift_detected{{{s.model}}}"


# ---- GPU (DCGM first, pynvml second: the rules' slm:gpu_* series) ----------------------------------------


def gpu_utilization(s: Scope) -> str:
    return f"slm:gpu_utilization:percent{{{s.sel}}}"


def gpu_memory_used(s: Scope) -> str:
    return f"slm:gpu_memory_used:percent{{{s.sel}}}"


def gpu_temperature(s: Scope) -> str:
    return f"slm:gpu_temperature:celsius{{{s.sel}}}"


def gpu_power(s: Scope) -> str:
    return f"slm:gpu_power:watts{{{s.sel}}}"


# ---- pods and capacity ----------------------------------------------------------------------------------


def targets_up(s: Scope) -> str:
    return f"sum(up{{{s.sel}}})"


def targets(s: Scope) -> str:
    return f"count(up{{{s.sel}}})"


def pod_restarts(s: Scope) -> str:
    return f"sum by (pod) (increase(kube_pod_container_status_restarts_total{{{s.pods}}}[1h]))"


def filesystem_free(s: Scope) -> str:
    return f"slm:filesystem_free:percent{{{s.sel}}}"


def model_load_seconds(s: Scope) -> str:
    return f"max(slm_model_load_seconds{{{s.model}}})"


def model_variable(s: Scope) -> str:
    """The `model` variable's query: the models this deployment serves."""
    return f"label_values(slm_model_info{{{s.sel}}}, model)"


# ---- the fleet dashboard (scope: the `namespace` variable) ----------------------------------------------

FLEET_SCOPE = 'namespace=~"$namespace"'
FLEET_NAMESPACES = "label_values(slm_model_info, namespace)"


def fleet_deployments() -> str:
    return f"max by (namespace, job, model, device, dtype) (slm_model_info{{{FLEET_SCOPE}}})"


def fleet_firing_alerts() -> str:
    return (
        "count by (namespace, job, alertname, severity) "
        f'(ALERTS{{alertname=~"SLM.*",alertstate="firing",{FLEET_SCOPE}}})'
    )


def fleet_request_rate() -> str:
    return f"sum by (namespace, job) (slm:requests:rate5m{{{FLEET_SCOPE}}})"


def fleet_error_ratio() -> str:
    # `or ... * 0`: a deployment without a 5xx yet reads 0, not "No data".
    return (
        f'(sum by (namespace, job) (slm:requests:rate5m{{{FLEET_SCOPE},status=~"5.."}})'
        f" or sum by (namespace, job) (slm:requests:rate5m{{{FLEET_SCOPE}}}) * 0)"
        f" / sum by (namespace, job) (slm:requests:rate5m{{{FLEET_SCOPE}}})"
    )


def fleet_response_time_p95() -> str:
    return f"slm:request_duration_seconds_p95:rate5m{{{FLEET_SCOPE}}}"


def fleet_time_to_first_token_p95() -> str:
    return f"slm:time_to_first_token_seconds_p95:rate5m{{{FLEET_SCOPE}}}"


def fleet_queue_utilization() -> str:
    return f"slm:queue_utilization:percent{{{FLEET_SCOPE}}}"


def fleet_gpu_utilization() -> str:
    return f"avg by (namespace, job) (slm:gpu_utilization:percent{{{FLEET_SCOPE}}})"
