"""Grafana dashboards (JSON model) for one SLMDeployment and for the fleet (owned by the monitoring work).

Built as data in Python, not templated JSON: every panel is a dict made by one small helper, queries
are PromQL strings scoped by the same selectors as the rules (slm_operator.monitoring.rules.selectors),
and the panels read the rules' recording series (slm:<what>:<window>) wherever an alert reads the same
thing, so a panel and its alert can never disagree. Conventions:

- the datasource is the dashboard variable `${datasource}` (type prometheus), never a fixed uid;
- the uid is derived from namespace/name, so re-rendering keeps links and bookmarks stable;
- the `model` variable filters every series that carries a `model` label;
- GPU panels read DCGM first and pynvml second (through the rules' slm:gpu_* recording series);
- alert thresholds from `alerts` are drawn on the matching panels (fieldConfig thresholds with
  thresholdsStyle), so the dashboard shows where the alert will fire.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

from slm_operator.monitoring.defaults import merged_alerts
from slm_operator.monitoring.rules import (
    burn_rate_windows,
    drift_settings,
    format_duration,
    parse_duration,
    rules_data,
    selectors,
)

SCHEMA_VERSION = 39  # Grafana 10.4/11 dashboard JSON schema
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
PANEL_HEIGHT = 8
TAGS = ["slm", "slm-monitoring"]


def dashboard_uid(*, namespace: str, name: str) -> str:
    """Stable, unique per deployment, within Grafana's 40-character limit."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:16]
    return f"slm-{digest}"


# ---- panel helpers --------------------------------------------------------------------------------


def _target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, **extra}


def _targets(*queries: tuple[str, str]) -> list[dict[str, Any]]:
    return [_target(expr, legend, chr(ord("A") + index)) for index, (expr, legend) in enumerate(queries)]


def _quantile(q: float, buckets: str, selector: str, window: str | None = None) -> str:
    """histogram_quantile over `buckets` (a raw _bucket counter with `window`, or a recorded bucket rate)."""
    series = f"rate({buckets}{{{selector}}}[{window}])" if window else f"{buckets}{{{selector}}}"
    return f"histogram_quantile({q:.2f}, sum by (le) ({series}))"


def _thresholds(*steps: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def _above(threshold: float) -> dict[str, Any]:
    """Green below, red from `threshold` up (the alert fires above it)."""
    return _thresholds(("green", None), ("red", threshold))


def _timeseries(
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    description: str = "",
    thresholds: dict[str, Any] | None = None,
    stack: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 20 if stack else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "line+area" if thresholds else "off"},
    }
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": custom,
        "color": {"mode": "palette-classic"},
        "thresholds": thresholds or _thresholds(("green", None)),
    }
    if unit in ("percent", "percentunit"):  # a share's axis starts at 0; a percentage also ends at 100
        minimum = 0 if minimum is None else minimum
        if unit == "percent" and maximum is None:
            maximum = 100
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def _heatmap(title: str, expr: str, *, description: str, unit: str = "short") -> dict[str, Any]:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [_target(expr, "{{le}}", format="heatmap")],
        "fieldConfig": {
            "defaults": {"custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False}}},
            "overrides": [],
        },
        "options": {
            "calculate": False,
            "yAxis": {"axisPlacement": "left", "unit": unit},
            "rowsFrame": {"layout": "le"},
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "cellGap": 1,
            "tooltip": {"mode": "single", "yHistogram": True},
        },
    }


def _stat(
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    description: str = "",
    thresholds: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": thresholds or _thresholds(("green", None)),
                "color": {"mode": "thresholds"},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def _table(title: str, expr: str, *, description: str) -> dict[str, Any]:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [_target(expr, format="table", instant=True)],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
    }


def _row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def _layout(sections: list[tuple[str, list[tuple[dict[str, Any], int]]]]) -> list[dict[str, Any]]:
    """Rows of panels, each (panel, width); ids and gridPos assigned in order."""
    panels: list[dict[str, Any]] = []
    y = 0
    ids = iter(range(1, 1000))
    for title, row_panels in sections:
        row = _row(title)
        row["id"] = next(ids)
        row["gridPos"] = {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}
        panels.append(row)
        y += 1
        x = 0
        for panel, width in row_panels:
            if x + width > GRID_WIDTH:
                x, y = 0, y + PANEL_HEIGHT
            panel["id"] = next(ids)
            panel["gridPos"] = {"h": PANEL_HEIGHT, "w": width, "x": x, "y": y}
            panels.append(panel)
            x += width
        y += PANEL_HEIGHT
    return panels


def _datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "includeAll": False,
        "multi": False,
    }


def _query_variable(
    name: str, label: str, query: str, *, current: str | None = None, include_all: bool = True
) -> dict[str, Any]:
    variable: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,  # on time range change: a new model shows up without a reload
        "includeAll": include_all,
        "allValue": ".*",
        "multi": False,
        "sort": 1,
        "hide": 0,
        "regex": "",
        "current": {"text": current, "value": current} if current else {},
    }
    return variable


def _dashboard(
    *,
    uid: str,
    title: str,
    description: str,
    variables: list[dict[str, Any]],
    panels: list[dict[str, Any]],
    tags: list[str],
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": tags,
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables},
        "panels": panels,
    }


# ---- the per-deployment dashboard -------------------------------------------------------------


def render_dashboard(*, name: str, namespace: str, model: str, alerts: Mapping[str, Any] | None) -> dict[str, Any]:
    """The per-deployment dashboard; alert thresholds from `alerts` drawn on the matching panels."""
    merged = merged_alerts(dict(alerts) if alerts is not None else None)
    base = selectors(name=name, namespace=namespace)
    sel, req, pods = base["sel"], base["req"], base["pods"]
    msel = f'{sel},model=~"$model"'
    rate = "$__rate_interval"

    error_t = float(merged["errorRate"]["threshold"])
    error_window = format_duration(parse_duration(merged["errorRate"]["window"]))
    latency_t = float(merged["latencyP95"]["thresholdSeconds"])
    ttft_t = float(merged["timeToFirstToken"]["thresholdSeconds"])
    gpu_t = float(merged["gpuUtilization"]["thresholdPercent"])
    gpu_mem_t = float(merged["gpuMemory"]["thresholdPercent"])
    queue_t = float(merged["queueSaturation"]["thresholdPercent"])
    disk = merged["diskSpace"]
    budget = 1 - float(merged["slo"]["availabilityPercent"]) / 100
    burns = burn_rate_windows(merged)
    page_factor = float(burns[0]["factor"])

    drift_names = {}
    for drift in rules_data()["drift"]:
        settings = drift_settings(merged[drift["config"]])
        drift_names[drift["signal"]] = {
            "mean": f"slm:{drift['what']}:mean{settings['window']}",
            "zscore": f"slm:{drift['what']}:zscore{settings['window']}",
            "z": float(merged[drift["config"]]["zScore"]),
            "window": settings["window"],
        }
    drift_z = max(entry["z"] for entry in drift_names.values())

    traffic = [
        (
            _timeseries(
                "Request rate",
                _targets((f"sum by (endpoint) (slm:requests:rate5m{{{sel}}})", "{{endpoint}}")),
                unit="reqps",
                description="Requests per second by endpoint (5m rate; probes and scrapes excluded).",
                stack=True,
            ),
            8,
        ),
        (
            _timeseries(
                "Error rate",
                _targets(
                    (
                        f'(sum by (endpoint) (slm:requests:rate5m{{{sel},status=~"5.."}})'
                        f" or sum by (endpoint) (slm:requests:rate5m{{{sel}}}) * 0)"
                        f" / sum by (endpoint) (slm:requests:rate5m{{{sel}}})",
                        "{{endpoint}}",
                    ),
                    (f"slm:error_ratio:rate{error_window}{{{sel}}}", f"all endpoints, {error_window} (alert)"),
                ),
                unit="percentunit",
                description=f"Share of requests answered with 5xx. SLMHighErrorRate fires above {error_t:g}.",
                thresholds=_above(error_t),
                minimum=0,
            ),
            8,
        ),
        (
            _timeseries(
                "Response time p50 / p95",
                _targets(
                    (f"slm:request_duration_seconds_p95:rate5m{{{sel}}}", "p95 (alert)"),
                    (f"slm:request_duration_seconds_p50:rate5m{{{sel}}}", "p50"),
                    (
                        f"histogram_quantile(0.95, sum by (endpoint, le) "
                        f"(slm:request_duration_seconds_bucket:rate5m{{{sel}}}))",
                        "p95 {{endpoint}}",
                    ),
                    (
                        f"histogram_quantile(0.50, sum by (endpoint, le) "
                        f"(slm:request_duration_seconds_bucket:rate5m{{{sel}}}))",
                        "p50 {{endpoint}}",
                    ),
                ),
                unit="s",
                description=f"Request duration quantiles. SLMSlowResponseTime fires when p95 exceeds {latency_t:g}s.",
                thresholds=_above(latency_t),
                minimum=0,
            ),
            8,
        ),
        (
            _timeseries(
                "Error budget burn rate",
                _targets(
                    (f"slm:error_ratio:rate{burns[0]['long']}{{{sel}}} / {budget:g}", f"{burns[0]['long']} window"),
                    (f"slm:error_ratio:rate{burns[1]['long']}{{{sel}}} / {budget:g}", f"{burns[1]['long']} window"),
                    (f"slm:error_ratio:rate{burns[2]['long']}{{{sel}}} / {budget:g}", f"{burns[2]['long']} window"),
                ),
                unit="x",
                description=(
                    f"How fast the {merged['slo']['window']} error budget of the "
                    f"{merged['slo']['availabilityPercent']}% SLO burns (1 = exactly on budget). "
                    f"SLMErrorBudgetBurnFast pages above {page_factor:g}x."
                ),
                thresholds=_thresholds(("green", None), ("orange", 1), ("red", page_factor)),
                minimum=0,
            ),
            12,
        ),
        (
            _table(
                "Model",
                f"slm_model_info{{{msel}}}",
                description="The served model as the server reports it (slm_model_info).",
            ),
            12,
        ),
    ]

    generation = [
        (
            _timeseries(
                "Time to first token",
                _targets(
                    (f"slm:time_to_first_token_seconds_p95:rate5m{{{msel}}}", "p95 (alert)"),
                    (
                        _quantile(0.5, "slm:time_to_first_token_seconds_bucket:rate5m", msel),
                        "p50",
                    ),
                ),
                unit="s",
                description=f"Arrival to first token, queue included. SLMHighTimeToFirstToken fires above {ttft_t:g}s.",
                thresholds=_above(ttft_t),
                minimum=0,
            ),
            8,
        ),
        (
            _timeseries(
                "Inter-token latency",
                _targets(
                    (
                        _quantile(0.95, "slm_inter_token_latency_seconds_bucket", msel, rate),
                        "p95",
                    ),
                    (
                        _quantile(0.50, "slm_inter_token_latency_seconds_bucket", msel, rate),
                        "p50",
                    ),
                ),
                unit="s",
                description="Time between two generated tokens of a request.",
                minimum=0,
            ),
            8,
        ),
        (
            _timeseries(
                "Tokens per second",
                _targets(
                    (f"sum(rate(slm_generation_tokens_total{{{msel}}}[{rate}]))", "generated (all requests)"),
                    (f"sum(rate(slm_prompt_tokens_total{{{msel}}}[{rate}]))", "prompt (all requests)"),
                    (
                        f"sum(rate(slm_prefix_cache_hits_total{{{msel}}}[{rate}]))",
                        "prompt, from the prefix cache (not fed)",
                    ),
                    (
                        _quantile(0.50, "slm_request_tokens_per_second_bucket", msel, rate),
                        "per request p50",
                    ),
                ),
                unit="short",
                description="Throughput of the deployment and decoding speed of a single request; of the prompt "
                "tokens, those found in the prefix cache skip the model (spec.server.prefixCacheMiB).",
                minimum=0,
            ),
            8,
        ),
        (
            _timeseries(
                "In-flight and queued requests",
                _targets(
                    (f"sum(slm_requests_in_flight{{{msel}}})", "in flight"),
                    (f"sum(slm_requests_queued{{{msel}}})", "queued"),
                    (f"sum(slm_max_concurrent_requests{{{msel}}})", "concurrency limit"),
                    (f"sum(slm_max_queue{{{msel}}})", "queue limit"),
                    (
                        f"sum(rate(slm_forward_pass_generations_total{{{msel}}}[{rate}]))"
                        f" / sum(rate(slm_forward_passes_total{{{msel}}}[{rate}]))",
                        "mean batch (generations per forward pass)",
                    ),
                ),
                description="Generations running and waiting, with the limits from spec.server, and how many "
                "generations share each forward pass (continuous batching; at most spec.server.maxBatchSize).",
                minimum=0,
            ),
            8,
        ),
        (
            _timeseries(
                "Queue utilisation",
                _targets((f"slm:queue_utilization:percent{{{msel}}}", "{{model}}")),
                unit="percent",
                description=f"Queued requests over the queue limit. SLMQueueSaturated fires above {queue_t:g}%.",
                thresholds=_above(queue_t),
            ),
            8,
        ),
        (
            _timeseries(
                "Finish reasons",
                _targets(
                    (f"sum by (finish_reason) (rate(slm_request_finish_total{{{msel}}}[{rate}]))", "{{finish_reason}}"),
                    (f"sum(rate(slm_empty_outputs_total{{{msel}}}[{rate}]))", "empty outputs"),
                    (f"sum(rate(slm_repetitive_outputs_total{{{msel}}}[{rate}]))", "repetitive outputs"),
                    (
                        f'sum(rate(slm_structured_outputs_total{{{msel},result="incomplete"}}[{rate}]))',
                        "JSON cut short (response_format)",
                    ),
                ),
                unit="reqps",
                description="Why generations ended (stop, length, error, timeout, cancelled), plus degenerate outputs: "
                "empty, repetitive, and JSON that a response_format asked for but that ended incomplete (max_tokens "
                "too low for the schema, a stop string, a timeout).",
                stack=True,
            ),
            8,
        ),
        (
            _timeseries(
                "KV cache memory",
                _targets(
                    (f"sum(slm_kv_cache_bytes{{{msel}}})", "running generations"),
                    (
                        f"sum(slm_kv_cache_bytes{{{msel}}})"
                        f' * sum(slm_kv_cache_positions{{{msel},kind="padding"}})'
                        f" / clamp_min(sum(slm_kv_cache_positions{{{msel}}}), 1)",
                        "of which padding",
                    ),
                    (f"sum(slm_prefix_cache_bytes{{{msel}}})", "prefix cache"),
                    (f"sum(slm_prefix_cache_capacity_bytes{{{msel}}})", "prefix cache budget"),
                ),
                unit="bytes",
                description="Model-device memory held by the KV cache of the generations running (their batch is "
                "left-padded to its longest: the padding's share) and by the prefix cache, against its budget "
                "(spec.server.prefixCacheMiB).",
                minimum=0,
            ),
            8,
        ),
    ]

    quality = [
        (
            _timeseries(
                "Perplexity",
                _targets(
                    (f"{drift_names['perplexity']['mean']}{{{msel}}}", f"mean ({drift_names['perplexity']['window']})"),
                    (
                        _quantile(0.95, "slm_request_perplexity_bucket", msel, rate),
                        "p95",
                    ),
                    (
                        _quantile(0.50, "slm_request_perplexity_bucket", msel, rate),
                        "p50",
                    ),
                ),
                description="Perplexity of the generated tokens under the model; a shift means new inputs or outputs.",
                minimum=0,
            ),
            8,
        ),
        (
            _timeseries(
                "Output length",
                _targets(
                    (
                        f"{drift_names['output_length']['mean']}{{{sel}}}",
                        f"mean ({drift_names['output_length']['window']})",
                    ),
                    (
                        _quantile(0.95, "model_output_tokens_bucket", req, rate),
                        "p95",
                    ),
                    (
                        _quantile(0.50, "model_output_tokens_bucket", req, rate),
                        "p50",
                    ),
                ),
                description="Generated tokens per request.",
                minimum=0,
            ),
            8,
        ),
        (
            _heatmap(
                "Output token distribution",
                f"sum by (le) (rate(model_output_tokens_bucket{{{req}}}[{rate}]))",
                description="Output tokens per request over time (the seed's token count heatmap).",
            ),
            8,
        ),
        (
            _timeseries(
                "Drift z-scores (PromQL baseline)",
                _targets(
                    (f"{drift_names['perplexity']['zscore']}{{{msel}}}", "perplexity"),
                    (f"{drift_names['output_length']['zscore']}{{{sel}}}", "output length"),
                ),
                description=(
                    "Short-window mean against its own history, in standard deviations; the drift alerts fire "
                    "beyond the configured z-score (either sign)."
                ),
                thresholds=_thresholds(("red", None), ("green", -drift_z), ("red", drift_z)),
            ),
            12,
        ),
        (
            _timeseries(
                "Drift scores (server)",
                _targets(
                    (f"slm_drift_score{{{msel}}}", "{{signal}}"),
                    (f"slm_drift_detected{{{msel}}}", "detected {{signal}}"),
                ),
                description="Drift scores computed inside the server per signal, and whether its detector flags drift.",
            ),
            12,
        ),
    ]

    gpu = [
        (
            _timeseries(
                "GPU utilisation",
                _targets((f"slm:gpu_utilization:percent{{{sel}}}", "{{pod}} GPU {{gpu}}")),
                unit="percent",
                description=f"DCGM_FI_DEV_GPU_UTIL, else pynvml. SLMHighGPUUtilization fires above {gpu_t:g}%.",
                thresholds=_above(gpu_t),
            ),
            6,
        ),
        (
            _timeseries(
                "GPU memory used",
                _targets((f"slm:gpu_memory_used:percent{{{sel}}}", "{{pod}} GPU {{gpu}}")),
                unit="percent",
                description=f"Framebuffer in use (DCGM, else pynvml). SLMHighGPUMemory fires above {gpu_mem_t:g}%.",
                thresholds=_above(gpu_mem_t),
            ),
            6,
        ),
        (
            _timeseries(
                "GPU temperature",
                _targets((f"slm:gpu_temperature:celsius{{{sel}}}", "{{pod}} GPU {{gpu}}")),
                unit="celsius",
                description="DCGM_FI_DEV_GPU_TEMP, else pynvml.",
            ),
            6,
        ),
        (
            _timeseries(
                "GPU power",
                _targets((f"slm:gpu_power:watts{{{sel}}}", "{{pod}} GPU {{gpu}}")),
                unit="watt",
                description="DCGM_FI_DEV_POWER_USAGE, else pynvml.",
            ),
            6,
        ),
    ]

    health = [
        (
            _stat(
                "Targets up",
                _targets((f"sum(up{{{sel}}})", "up"), (f"count(up{{{sel}}})", "targets")),
                description="Server pods Prometheus can scrape, of those it should. SLMTargetDown fires on any 0.",
            ),
            6,
        ),
        (
            _timeseries(
                "Pod restarts",
                _targets(
                    (f"sum by (pod) (increase(kube_pod_container_status_restarts_total{{{pods}}}[1h]))", "{{pod}}")
                ),
                description="Container restarts in the last hour (kube-state-metrics).",
                minimum=0,
            ),
            6,
        ),
        (
            _timeseries(
                "Free disk space",
                _targets((f"slm:filesystem_free:percent{{{sel}}}", "{{pod}} {{mountpoint}}")),
                unit="percent",
                description=(
                    f"Free space of the server's filesystems. SLMLowDiskSpace fires below "
                    f"{float(disk['minFreePercent']):g}% on {disk['mountpoint']}."
                ),
                thresholds=_thresholds(("red", None), ("green", float(disk["minFreePercent"]))),
            ),
            6,
        ),
        (
            _stat(
                "Model load time",
                _targets((f"max(slm_model_load_seconds{{{msel}}})", "load")),
                unit="s",
                description="How long the last model load took.",
            ),
            6,
        ),
    ]

    panels = _layout(
        [
            ("Traffic and errors", traffic),
            ("Generation", generation),
            ("Model behaviour", quality),
            ("GPU", gpu),
            ("Pods and capacity", health),
        ]
    )
    variables = [
        _datasource_variable(),
        _query_variable("model", "Model", f"label_values(slm_model_info{{{sel}}}, model)", current=model),
    ]
    return _dashboard(
        uid=dashboard_uid(namespace=namespace, name=name),
        title=f"SLM / {namespace} / {name}",
        description=f"SLMDeployment {namespace}/{name} serving {model} (generated by slm-operator; edits are lost).",
        variables=variables,
        panels=panels,
        tags=[*TAGS, f"namespace:{namespace}"],
    )


# ---- the fleet dashboard ----------------------------------------------------------------------


def render_fleet_dashboard() -> dict[str, Any]:
    """The fleet overview dashboard shipped by the Helm chart."""
    scope = 'namespace=~"$namespace"'
    panels = _layout(
        [
            (
                "Fleet",
                [
                    (
                        _table(
                            "Deployments",
                            f"max by (namespace, job, model, device, dtype) (slm_model_info{{{scope}}})",
                            description="Every SLMDeployment whose server Prometheus scrapes.",
                        ),
                        12,
                    ),
                    (
                        _table(
                            "Firing SLM alerts",
                            "count by (namespace, job, alertname, severity) "
                            f'(ALERTS{{alertname=~"SLM.*",alertstate="firing",{scope}}})',
                            description="Alerts of the SLM rules now firing, per deployment.",
                        ),
                        12,
                    ),
                ],
            ),
            (
                "Service level",
                [
                    (
                        _timeseries(
                            "Request rate",
                            _targets(
                                (f"sum by (namespace, job) (slm:requests:rate5m{{{scope}}})", "{{namespace}}/{{job}}")
                            ),
                            unit="reqps",
                            description="Requests per second per deployment.",
                        ),
                        8,
                    ),
                    (
                        _timeseries(
                            "Error ratio",
                            _targets((f"slm:error_ratio:rate5m{{{scope}}}", "{{namespace}}/{{job}}")),
                            unit="percentunit",
                            description="Share of 5xx answers per deployment (5m).",
                        ),
                        8,
                    ),
                    (
                        _timeseries(
                            "Response time p95",
                            _targets((f"slm:request_duration_seconds_p95:rate5m{{{scope}}}", "{{namespace}}/{{job}}")),
                            unit="s",
                            description="95th percentile request duration per deployment.",
                            minimum=0,
                        ),
                        8,
                    ),
                    (
                        _timeseries(
                            "Time to first token p95",
                            _targets(
                                (f"slm:time_to_first_token_seconds_p95:rate5m{{{scope}}}", "{{namespace}}/{{job}}")
                            ),
                            unit="s",
                            description="95th percentile time to first token per deployment.",
                            minimum=0,
                        ),
                        8,
                    ),
                    (
                        _timeseries(
                            "Queue utilisation",
                            _targets((f"slm:queue_utilization:percent{{{scope}}}", "{{namespace}}/{{job}}")),
                            unit="percent",
                            description="Queued requests as a share of each deployment's queue limit.",
                        ),
                        8,
                    ),
                    (
                        _timeseries(
                            "GPU utilisation",
                            _targets(
                                (
                                    f"avg by (namespace, job) (slm:gpu_utilization:percent{{{scope}}})",
                                    "{{namespace}}/{{job}}",
                                )
                            ),
                            unit="percent",
                            description="Mean GPU utilisation per deployment (DCGM first, pynvml second).",
                        ),
                        8,
                    ),
                ],
            ),
        ]
    )
    variables = [
        _datasource_variable(),
        _query_variable("namespace", "Namespace", "label_values(slm_model_info, namespace)"),
    ]
    return _dashboard(
        uid="slm-fleet",
        title="SLM / Fleet overview",
        description="All SLMDeployments at a glance (shipped by the slm-monitoring chart).",
        variables=variables,
        panels=panels,
        tags=TAGS,
    )


def iter_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, in layout order."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
