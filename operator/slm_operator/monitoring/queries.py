"""The PromQL of every dashboard panel, one function per query (owned by the monitoring work).

Queries are scoped by the same selectors as the rules (slm_operator.monitoring.rules.selectors). Every
engine signal (requests, errors, latency quantiles, time to first token, inter-token latency, running and
waiting requests, prompt and generated tokens, KV-cache usage, preemptions) is read from the shared
recording rules' series (slm:<what>:<window>), which every runtime's rule group records from that runtime's
own series, never from a runtime's native names: one dashboard serves the built-in server, vLLM, SGLang, TGI
and llama.cpp alike. Where an alert reads the same thing, the panel reads the alert's very series or
expression (the error ratio over a resource's window), so a panel and its alert can never disagree.

What the server and the monitoring sidecar both expose (the `slm_*` contract: perplexity, output length,
finish reasons, drift) is read as exposed; so is what only the built-in engine measures (its batches, KV
cache bytes, prefix cache, limits). Most recorded series carry no `model` label (one model per deployment):
those queries are scoped by `Scope.sel`, not by the `model` variable, which would filter them all out.
Panel layout, legends and units live in slm_operator.monitoring.dashboards.
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


# Runtimes whose request series carry no route (vLLM, TGI) record no `endpoint`: their one series is named so.
ALL_ROUTES = "all routes"


def _named_routes(expr: str) -> str:
    """`expr` (by endpoint) with a series of no endpoint labelled ALL_ROUTES, so its legend is not empty."""
    return f'label_replace({expr}, "endpoint", "{ALL_ROUTES}", "endpoint", "")'


def request_rate_by_endpoint(s: Scope) -> str:
    return _named_routes(f"sum by (endpoint) (slm:requests:rate5m{{{s.sel}}})")


def error_ratio_by_endpoint(s: Scope) -> str:
    # `or ... * 0`: an endpoint without a 5xx yet reads 0, not "No data". Runtimes without an HTTP status
    # record "5xx" for the server's failures, which `5..` matches too.
    return _named_routes(
        f'((sum by (endpoint) (slm:requests:rate5m{{{s.sel},status=~"5.."}})'
        f" or sum by (endpoint) (slm:requests:rate5m{{{s.sel}}}) * 0)"
        f" / sum by (endpoint) (slm:requests:rate5m{{{s.sel}}}))"
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


# The quantiles of the time between two tokens the shared rules record (TGI: of each request's mean).
_INTER_TOKEN = {0.95: "slm:inter_token_latency_seconds_p95:rate5m",
                0.50: "slm:inter_token_latency_seconds_p50:rate5m"}  # fmt: skip


def inter_token_latency(s: Scope, q: float) -> str:
    if q not in _INTER_TOKEN:
        raise ValueError(f"the shared rules record the p95 and p50 of inter-token latency, not the {q:g} quantile")
    return f"{_INTER_TOKEN[q]}{{{s.sel}}}"


def inter_token_latency_mean(s: Scope) -> str:
    """The mean time per generated token: the one decoding figure llama.cpp gives (no histogram)."""
    return f"slm:inter_token_latency_seconds:mean5m{{{s.sel}}}"


def generated_tokens_rate(s: Scope) -> str:
    return f"sum(slm:generated_tokens:rate5m{{{s.sel}}})"


def prompt_tokens_rate(s: Scope) -> str:
    return f"sum(slm:prompt_tokens:rate5m{{{s.sel}}})"


def prefix_cache_hits_rate(s: Scope) -> str:
    return f"sum(rate(slm_prefix_cache_hits_total{{{s.model}}}[{RATE}]))"


def request_tokens_per_second(s: Scope, q: float) -> str:
    return _quantile(q, "slm_request_tokens_per_second_bucket", s.model, RATE)


def requests_running(s: Scope) -> str:
    return f"sum(slm:requests_running:sum{{{s.sel}}})"


def requests_waiting(s: Scope) -> str:
    return f"sum(slm:requests_waiting:sum{{{s.sel}}})"


# `> 0`: the sidecar in front of another runtime exposes the built-in server's limits as 0 (the runtime's
# own limits are not the sidecar's); a limit of 0 drawn on the panel would be wrong.
def concurrency_limit(s: Scope) -> str:
    return f"sum(slm_max_concurrent_requests{{{s.model}}}) > 0"


def queue_limit(s: Scope) -> str:
    return f"sum(slm_max_queue{{{s.model}}}) > 0"


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


def kv_cache_usage(s: Scope) -> str:
    """The share of the KV cache in use per pod, in percent (vLLM, SGLang): SLMKVCacheSaturated's series."""
    return f"slm:kv_cache_usage:percent{{{s.sel}}}"


def preemptions_rate(s: Scope) -> str:
    """Requests preempted per second (vLLM, SGLang): SLMRequestsPreempted's series."""
    return f"slm:preemptions:rate5m{{{s.sel}}}"


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
    # `> 0`: the sidecar does not see the runtime load its model and reports 0.
    return f"max(slm_model_load_seconds{{{s.model}}}) > 0"


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
