"""Grafana dashboards (JSON model) for one SLMDeployment and for the fleet (owned by the monitoring work).

Built with grafana-foundation-sdk, Grafana's own builders generated from its dashboard schema (a panel
option Grafana does not know does not type-check), one function per dashboard row. The PromQL lives in
slm_operator.monitoring.queries. Conventions:

- the datasource is the dashboard variable `${datasource}` (type prometheus), never a fixed uid;
- the uid is derived from namespace/name, so re-rendering keeps links and bookmarks stable;
- the `model` variable filters every series that carries a `model` label;
- GPU panels read DCGM first and pynvml second (through the shared rules' slm:gpu_* recording series);
- alert thresholds from `alerts` are drawn on the matching panels (fieldConfig thresholds with
  thresholdsStyle), so the dashboard shows where the alert will fire;
- one JSON for every runtime (built-in, vLLM, SGLang, TGI, llama.cpp): engine signals come from the shared
  recording rules' `slm:*` series (slm_operator.monitoring.queries). A panel none of whose queries a runtime
  can answer says so instead of "No data" (fieldConfig `noValue`), and its description says why, with the
  runtime's own reason (data/runtime_metrics.yaml); `RuntimeGaps` tells a missing signal from no data yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    Dashboard,
    DatasourceVariable,
    FieldColor,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode
from grafana_foundation_sdk.models.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from slm_operator.monitoring import load_data, queries
from slm_operator.monitoring.defaults import merged_alerts
from slm_operator.monitoring.metric_names import metric_names
from slm_operator.monitoring.queries import Scope
from slm_operator.monitoring.rules import (
    DEFAULT_RUNTIME,
    _why_missing,
    burn_rate_windows,
    drift_series,
    drift_settings,
    format_duration,
    parse_duration,
    render_rule_groups,
    runtime_names,
    runtime_records,
)

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
PANEL_HEIGHT = 8
TAGS = ["slm", "slm-monitoring"]

Panel = timeseries.Panel | heatmap.Panel | stat.Panel | table.Panel
Query = tuple[str, str]  # (PromQL, legend)
Steps = list[tuple[str, float | None]]  # threshold steps (colour, value from which it applies)


# How the panels name each runtime when they say it lacks a signal.
RUNTIME_TITLES = {"builtin": "the built-in server", "vllm": "vLLM", "sglang": "SGLang", "tgi": "TGI",
                  "llamacpp": "llama.cpp"}  # fmt: skip

# Series that only the built-in server's engine measures. The sidecar in front of another runtime is the
# server's own code without its engine (docs/sidecar.md): it exposes none of these, or 0 for the limits and
# the load time (the queries keep only values above 0).
BUILTIN_ENGINE_SERIES = frozenset({
    "slm_forward_passes_total", "slm_forward_pass_generations_total", "slm_batch_size",
    "slm_kv_cache_bytes", "slm_kv_cache_positions",
    "slm_prefix_cache_hits_total", "slm_prefix_cache_queries_total", "slm_prefix_cache_bytes",
    "slm_prefix_cache_capacity_bytes",
    "slm_max_concurrent_requests", "slm_max_queue", "slm_model_load_seconds",
})  # fmt: skip
BUILTIN_ENGINE_REASON = (
    "only the built-in server's engine measures it; the sidecar in front of another runtime cannot see inside it"
)


@dataclasses.dataclass(frozen=True)
class RuntimeGaps:
    """Which runtimes can answer a panel query, to tell a signal a runtime lacks from "no data yet".

    `recorded`: per runtime, the `slm:*` series its deployments get: its shared rule group's and those of
    the deployment's own groups rendered for it (the drift means). A query can be answered by a runtime when
    it records every `slm:*` series the query reads and (unless it is the built-in server) the query reads
    no series of BUILTIN_ENGINE_SERIES; the rest (the `slm_*` contract of the server and the sidecar,
    Prometheus', kube-state-metrics') every deployment has.
    """

    recorded: Mapping[str, frozenset[str]]
    drift_reads: Mapping[str, frozenset[str]]  # a per-deployment drift series: the shared series its mean reads
    rows: Mapping[str, Mapping[str, Any]]  # the shared recording rules' rows (rules.yaml), by series

    @classmethod
    def of(cls, alerts: Mapping[str, Any] | None) -> RuntimeGaps:
        recorded = {}
        for runtime in runtime_names():
            groups = render_rule_groups(name="gaps", namespace="gaps", alerts=alerts, runtime=runtime)
            own = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
            recorded[runtime] = runtime_records(runtime) | own
        drift_reads: dict[str, frozenset[str]] = {}
        means = {drift["signal"]: frozenset(metric_names(drift["mean"])) for drift in load_data("rules.yaml")["drift"]}
        for signal, series in drift_series(alerts).items():
            for name in series.values():
                drift_reads[name] = means[signal]
        rows = {row["record"]: row for row in load_data("rules.yaml")["recording"]}
        return cls(recorded=recorded, drift_reads=drift_reads, rows=rows)

    def reasons(self, expr: str, runtime: str) -> list[str]:
        """Why `runtime` cannot answer `expr` (its own words, one per missing signal); [] when it can."""
        found: list[str] = []
        rows = self.rows
        for name in sorted(metric_names(expr)):
            if name in BUILTIN_ENGINE_SERIES and runtime != DEFAULT_RUNTIME:
                found.append(BUILTIN_ENGINE_REASON)
            elif name.startswith("slm:") and name not in self.recorded[runtime]:
                # A shared series the runtime's group lacks, or a drift series whose mean it cannot compute.
                lacking = [name] if name in rows else sorted(self.drift_reads.get(name, set()) - self.recorded[runtime])
                found += [_why_missing(runtime, rows[series]) for series in lacking if series in rows]
        return list(dict.fromkeys(found))

    def lacking(self, exprs: list[str]) -> dict[str, list[str]]:
        """{runtime: reasons} of the runtimes that can answer none of `exprs` (a panel that stays empty)."""
        result = {}
        for runtime in runtime_names():
            reasons = [self.reasons(expr, runtime) for expr in exprs]
            if exprs and all(reasons):
                result[runtime] = list(dict.fromkeys(reason for each in reasons for reason in each))
        return result


def _titles(runtimes: list[str]) -> str:
    names = [RUNTIME_TITLES.get(runtime, runtime) for runtime in runtimes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def no_value_text(runtimes: list[str]) -> str:
    """What a panel shows instead of "No data" when `runtimes` cannot answer any of its queries."""
    return f"Not exposed by {_titles(runtimes)} (the panel's description says why); otherwise no data yet"


def _gaps_description(lacking: Mapping[str, list[str]]) -> str:
    """One sentence per reason: the runtimes it applies to, and the reason."""
    by_reason: dict[str, list[str]] = {}
    for runtime, reasons in lacking.items():
        by_reason.setdefault("; ".join(reasons), []).append(runtime)
    return " ".join(f"Not exposed by {_titles(runtimes)}: {reason}." for reason, runtimes in by_reason.items())


def dashboard_uid(*, namespace: str, name: str) -> str:
    """Stable, unique per deployment, within Grafana's 40-character limit."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:16]
    return f"slm-{digest}"


# ---- panel helpers --------------------------------------------------------------------------------


def _target(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().datasource(DATASOURCE).expr(expr).legend_format(legend or "__auto").ref_id(ref)


def _targets(*items: Query) -> list[Builder[Dataquery]]:
    return [_target(expr, legend, chr(ord("A") + index)) for index, (expr, legend) in enumerate(items)]


def _thresholds(steps: Steps) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=color) for color, value in steps])
    )


def _above(threshold: float) -> Steps:
    """Green below, red from `threshold` up (the alert fires above it)."""
    return [("green", None), ("red", threshold)]


def _timeseries(
    title: str,
    items: list[Query],
    *,
    width: int,
    unit: str = "short",
    description: str = "",
    thresholds: Steps | None = None,
    stack: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(*items))
        .span(width)
        .height(PANEL_HEIGHT)
        .unit(unit)
        .draw_style(common.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(20 if stack else 10)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .stacking(
            common_builders.StackingConfig()
            .mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE)
            .group("A")
        )
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.LINE_AND_AREA if thresholds else common.GraphThresholdsStyleMode.OFF
            )
        )
        .color_scheme(FieldColor().mode(model.FieldColorModeId.PALETTE_CLASSIC))
        .thresholds(_thresholds(thresholds or [("green", None)]))
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
    )
    if unit in ("percent", "percentunit"):  # a share's axis starts at 0; a percentage also ends at 100
        minimum = 0 if minimum is None else minimum
        if unit == "percent" and maximum is None:
            maximum = 100
    if minimum is not None:
        panel.min(minimum)
    if maximum is not None:
        panel.max(maximum)
    return panel


def _heatmap(title: str, expr: str, *, width: int, description: str, unit: str = "short") -> heatmap.Panel:
    return (
        heatmap.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(_target(expr, "{{le}}", "A").format(PromQueryFormat.HEATMAP))
        .span(width)
        .height(PANEL_HEIGHT)
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().axis_placement(common.AxisPlacement.LEFT).unit(unit))
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .color(heatmap.HeatmapColorOptions().mode(HeatmapColorMode.SCHEME).scheme("Oranges").steps(64))
        .cell_gap(1)
        .mode(common.TooltipDisplayMode.SINGLE)
        .show_y_histogram()
        .hide_from(common_builders.HideSeriesConfig().legend(False).tooltip(False).viz(False))
    )


def _stat(title: str, items: list[Query], *, width: int, unit: str = "short", description: str = "") -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(*items))
        .span(width)
        .height(PANEL_HEIGHT)
        .unit(unit)
        .thresholds(_thresholds([("green", None)]))
        .color_scheme(FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(common.BigValueTextMode.AUTO)
    )


def _table(title: str, expr: str, *, width: int, description: str) -> table.Panel:
    return (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(_target(expr, "", "A").format(PromQueryFormat.TABLE).instant())
        .span(width)
        .height(PANEL_HEIGHT)
        .show_header(True)
        .with_transformation(
            model.DataTransformerConfig(id_val="organize", options={"excludeByName": {"Time": True, "Value": True}})
        )
    )


def _say_gaps(panel: Panel, gaps: RuntimeGaps) -> None:
    """A panel that some runtime cannot fill says so (noValue) and why (its description)."""
    built = panel.build()
    lacking = gaps.lacking([t.expr or "" for t in built.targets or [] if isinstance(t, PrometheusQuery)])
    if lacking:
        panel.no_value(no_value_text(list(lacking)))
        panel.description(f"{built.description} {_gaps_description(lacking)}".strip())


def _assemble(dashboard: Dashboard, rows: list[tuple[str, list[Panel]]], gaps: RuntimeGaps) -> Dashboard:
    """Each row title followed by its panels, ids in layout order; the builder lays out the grid."""
    ids = iter(range(1, 1000))
    for title, panels in rows:
        dashboard.with_row(Row(title).collapsed(False).id(next(ids)))
        for panel in panels:
            _say_gaps(panel, gaps)
            dashboard.with_panel(panel.id(next(ids)))
    return dashboard


def _datasource_variable() -> DatasourceVariable:
    return (
        DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .hide(model.VariableHide.DONT_HIDE)
        .include_all(False)
        .multi(False)
        .regex("")
    )


def _query_variable(name: str, label: str, query: str, *, current: str | None = None) -> QueryVariable:
    variable = (
        QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query({"query": query, "refId": f"{name}-variable"})
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)  # a new model shows up without a reload
        .include_all(True)
        .all_value(".*")
        .multi(False)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .hide(model.VariableHide.DONT_HIDE)
        .regex("")
    )
    if current:
        variable.current(model.VariableOption(text=current, value=current))
    return variable


def _dashboard(*, uid: str, title: str, description: str, tags: list[str]) -> Dashboard:
    return (
        Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(tags)
        .timezone("browser")
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .version(1)
        .refresh("30s")
        .time("now-6h", "now")
        .fiscal_year_start_month(0)
        .live_now(False)
        .links([])
        .annotation(
            AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .built_in(1)
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
        )
    )


def _to_json(dashboard: Dashboard) -> dict[str, Any]:
    built: dict[str, Any] = json.loads(JSONEncoder().encode(dashboard.build()))
    return built


# ---- the per-deployment dashboard -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Thresholds:
    """What the resource's alerts say, as the panels draw it."""

    error_ratio: float
    error_window: str
    latency_seconds: float
    ttft_seconds: float
    gpu_percent: float
    gpu_memory_percent: float
    queue_percent: float
    kv_cache_percent: float
    preemptions_per_second: float
    disk_free_percent: float
    disk_mountpoint: str
    budget: float
    burn_windows: list[str]
    page_factor: float
    slo_window: str
    availability_percent: float
    drift_z: float
    drift: dict[str, dict[str, str]]

    @classmethod
    def of(cls, alerts: Mapping[str, Any] | None) -> _Thresholds:
        merged = merged_alerts(dict(alerts) if alerts is not None else None)
        burns = burn_rate_windows(merged)
        series = drift_series(merged)
        windows = {
            "perplexity": drift_settings(merged["perplexityDrift"])["window"],
            "output_length": drift_settings(merged["outputLengthDrift"])["window"],
        }
        drift = {signal: {**names, "window": windows[signal]} for signal, names in series.items()}
        # The runtime-only alerts' settings: their defaults in rules.yaml, under what the resource sets.
        runtime_alerts = {spec["config"]: {**spec["defaults"], **merged.get(spec["config"], {})}
                          for spec in load_data("rules.yaml")["runtime_alerts"]}  # fmt: skip
        return cls(
            error_ratio=float(merged["errorRate"]["threshold"]),
            error_window=format_duration(parse_duration(merged["errorRate"]["window"])),
            latency_seconds=float(merged["latencyP95"]["thresholdSeconds"]),
            ttft_seconds=float(merged["timeToFirstToken"]["thresholdSeconds"]),
            gpu_percent=float(merged["gpuUtilization"]["thresholdPercent"]),
            gpu_memory_percent=float(merged["gpuMemory"]["thresholdPercent"]),
            queue_percent=float(merged["queueSaturation"]["thresholdPercent"]),
            kv_cache_percent=float(runtime_alerts["kvCacheSaturation"]["thresholdPercent"]),
            preemptions_per_second=float(runtime_alerts["requestPreemptions"]["thresholdPerSecond"]),
            disk_free_percent=float(merged["diskSpace"]["minFreePercent"]),
            disk_mountpoint=str(merged["diskSpace"]["mountpoint"]),
            budget=1 - float(merged["slo"]["availabilityPercent"]) / 100,
            burn_windows=[burn["long"] for burn in burns[:3]],
            page_factor=float(burns[0]["factor"]),
            slo_window=str(merged["slo"]["window"]),
            availability_percent=merged["slo"]["availabilityPercent"],
            drift_z=max(float(merged["perplexityDrift"]["zScore"]), float(merged["outputLengthDrift"]["zScore"])),
            drift=drift,
        )


def _traffic_row(s: Scope, t: _Thresholds) -> list[Panel]:
    return [
        _timeseries(
            "Request rate",
            [(queries.request_rate_by_endpoint(s), "{{endpoint}}")],
            width=8,
            unit="reqps",
            description="Requests per second by endpoint (5m rate; probes and scrapes excluded).",
            stack=True,
        ),
        _timeseries(
            "Error rate",
            [
                (queries.error_ratio_by_endpoint(s), "{{endpoint}}"),
                (queries.error_ratio(s, t.error_window), f"all endpoints, {t.error_window} (alert)"),
            ],
            width=8,
            unit="percentunit",
            description=f"Share of requests answered with 5xx. SLMHighErrorRate fires above {t.error_ratio:g}.",
            thresholds=_above(t.error_ratio),
            minimum=0,
        ),
        _timeseries(
            "Response time p50 / p95",
            [
                (queries.response_time_p95(s), "p95 (alert)"),
                (queries.response_time_p50(s), "p50"),
                (queries.response_time_by_endpoint(s, 0.95), "p95 {{endpoint}}"),
                (queries.response_time_by_endpoint(s, 0.50), "p50 {{endpoint}}"),
            ],
            width=8,
            unit="s",
            description="Request duration quantiles. "
            f"SLMSlowResponseTime fires when p95 exceeds {t.latency_seconds:g}s.",
            thresholds=_above(t.latency_seconds),
            minimum=0,
        ),
        _timeseries(
            "Error budget burn rate",
            [(queries.budget_burn_rate(s, window, t.budget), f"{window} window") for window in t.burn_windows],
            width=12,
            unit="x",
            description=(
                f"How fast the {t.slo_window} error budget of the {t.availability_percent}% SLO burns "
                f"(1 = exactly on budget). SLMErrorBudgetBurnFast pages above {t.page_factor:g}x."
            ),
            thresholds=[("green", None), ("orange", 1), ("red", t.page_factor)],
            minimum=0,
        ),
        _table(
            "Model",
            queries.model_info(s),
            width=12,
            description="The served model as the server reports it (slm_model_info).",
        ),
    ]


def _generation_row(s: Scope, t: _Thresholds) -> list[Panel]:
    return [
        _timeseries(
            "Time to first token",
            [(queries.time_to_first_token_p95(s), "p95 (alert)"), (queries.time_to_first_token_p50(s), "p50")],
            width=8,
            unit="s",
            description="Arrival to first token, queue included. "
            f"SLMHighTimeToFirstToken fires above {t.ttft_seconds:g}s.",
            thresholds=_above(t.ttft_seconds),
            minimum=0,
        ),
        _timeseries(
            "Inter-token latency",
            [
                (queries.inter_token_latency(s, 0.95), "p95"),
                (queries.inter_token_latency(s, 0.50), "p50"),
                (queries.inter_token_latency_mean(s), "mean"),
            ],
            width=8,
            unit="s",
            description="Time between two generated tokens of a request (TGI: quantiles of each request's mean "
            "time per token; llama.cpp: the mean only, it keeps no histogram).",
            minimum=0,
        ),
        _timeseries(
            "Tokens per second",
            [
                (queries.generated_tokens_rate(s), "generated (all requests)"),
                (queries.prompt_tokens_rate(s), "prompt (all requests)"),
                (queries.prefix_cache_hits_rate(s), "prompt, from the prefix cache (not fed)"),
                (queries.request_tokens_per_second(s, 0.50), "per request p50"),
            ],
            width=8,
            unit="short",
            description="Throughput of the deployment and decoding speed of a single request; of the prompt "
            "tokens, those found in the prefix cache skip the model (spec.server.prefixCacheMiB).",
            minimum=0,
        ),
        _timeseries(
            "In-flight and queued requests",
            [
                (queries.requests_running(s), "running"),
                (queries.requests_waiting(s), "waiting"),
                (queries.concurrency_limit(s), "concurrency limit"),
                (queries.queue_limit(s), "queue limit"),
                (queries.mean_batch_size(s), "mean batch (generations per forward pass)"),
            ],
            width=8,
            description="Requests being processed and waiting to be, as the runtime counts them; for the built-in "
            "server also the limits from spec.server and how many generations share each forward pass "
            "(continuous batching; at most spec.server.maxBatchSize).",
            minimum=0,
        ),
        _timeseries(
            "Queue utilisation",
            [(queries.queue_utilization(s), "{{model}}")],
            width=8,
            unit="percent",
            description=f"Queued requests over the queue limit. SLMQueueSaturated fires above {t.queue_percent:g}%.",
            thresholds=_above(t.queue_percent),
        ),
        _timeseries(
            "Finish reasons",
            [
                (queries.finish_reasons(s), "{{finish_reason}}"),
                (queries.empty_outputs_rate(s), "empty outputs"),
                (queries.repetitive_outputs_rate(s), "repetitive outputs"),
                (queries.incomplete_structured_outputs_rate(s), "JSON cut short (response_format)"),
            ],
            width=8,
            unit="reqps",
            description="Why generations ended (stop, length, error, timeout, cancelled), plus degenerate outputs: "
            "empty, repetitive, and JSON that a response_format asked for but that ended incomplete (max_tokens "
            "too low for the schema, a stop string, a timeout).",
            stack=True,
        ),
        _timeseries(
            "KV cache usage",
            [(queries.kv_cache_usage(s), "{{pod}}")],
            width=8,
            unit="percent",
            description="Share of the runtime's KV cache in use, per pod (vLLM: KV blocks, SGLang: the token "
            f"pool). SLMKVCacheSaturated fires above {t.kv_cache_percent:g}%.",
            thresholds=_above(t.kv_cache_percent),
        ),
        _timeseries(
            "Preemptions",
            [(queries.preemptions_rate(s), "preempted")],
            width=8,
            unit="reqps",
            description="Requests evicted from the running batch for want of KV cache, to be computed again "
            f"(SGLang calls it retraction). SLMRequestsPreempted fires above {t.preemptions_per_second:g}/s.",
            thresholds=_above(t.preemptions_per_second),
            minimum=0,
        ),
        _timeseries(
            "KV cache memory",
            [
                (queries.kv_cache_bytes(s), "running generations"),
                (queries.kv_cache_padding_bytes(s), "of which padding"),
                (queries.prefix_cache_bytes(s), "prefix cache"),
                (queries.prefix_cache_capacity_bytes(s), "prefix cache budget"),
            ],
            width=8,
            unit="bytes",
            description="Model-device memory held by the KV cache of the generations running (their batch is "
            "left-padded to its longest: the padding's share) and by the prefix cache, against its budget "
            "(spec.server.prefixCacheMiB).",
            minimum=0,
        ),
    ]


def _model_behaviour_row(s: Scope, t: _Thresholds) -> list[Panel]:
    perplexity, output_length = t.drift["perplexity"], t.drift["output_length"]
    return [
        _timeseries(
            "Perplexity",
            [
                (queries.drift_series(perplexity["mean"], s, per_model=True), f"mean ({perplexity['window']})"),
                (queries.perplexity_quantile(s, 0.95), "p95"),
                (queries.perplexity_quantile(s, 0.50), "p50"),
            ],
            width=8,
            description="Perplexity of the generated tokens under the model; a shift means new inputs or outputs.",
            minimum=0,
        ),
        _timeseries(
            "Output length",
            [
                (queries.drift_series(output_length["mean"], s, per_model=False), f"mean ({output_length['window']})"),
                (queries.output_tokens_quantile(s, 0.95), "p95"),
                (queries.output_tokens_quantile(s, 0.50), "p50"),
            ],
            width=8,
            description="Generated tokens per request.",
            minimum=0,
        ),
        _heatmap(
            "Output token distribution",
            queries.output_tokens_heatmap(s),
            width=8,
            description="Output tokens per request over time (the seed's token count heatmap).",
        ),
        _timeseries(
            "Drift z-scores (PromQL baseline)",
            [
                (queries.drift_series(perplexity["zscore"], s, per_model=True), "perplexity"),
                (queries.drift_series(output_length["zscore"], s, per_model=False), "output length"),
            ],
            width=12,
            description=(
                "Short-window mean against its own history, in standard deviations; the drift alerts fire "
                "beyond the configured z-score (either sign)."
            ),
            thresholds=[("red", None), ("green", -t.drift_z), ("red", t.drift_z)],
        ),
        _timeseries(
            "Drift scores (server)",
            [(queries.server_drift_score(s), "{{signal}}"), (queries.server_drift_detected(s), "detected {{signal}}")],
            width=12,
            description="Drift scores computed inside the server per signal, and whether its detector flags drift.",
        ),
    ]


def _gpu_row(s: Scope, t: _Thresholds) -> list[Panel]:
    legend = "{{pod}} GPU {{gpu}}"
    return [
        _timeseries(
            "GPU utilisation",
            [(queries.gpu_utilization(s), legend)],
            width=6,
            unit="percent",
            description=f"DCGM_FI_DEV_GPU_UTIL, else pynvml. SLMHighGPUUtilization fires above {t.gpu_percent:g}%.",
            thresholds=_above(t.gpu_percent),
        ),
        _timeseries(
            "GPU memory used",
            [(queries.gpu_memory_used(s), legend)],
            width=6,
            unit="percent",
            description="Framebuffer in use (DCGM, else pynvml). "
            f"SLMHighGPUMemory fires above {t.gpu_memory_percent:g}%.",
            thresholds=_above(t.gpu_memory_percent),
        ),
        _timeseries(
            "GPU temperature",
            [(queries.gpu_temperature(s), legend)],
            width=6,
            unit="celsius",
            description="DCGM_FI_DEV_GPU_TEMP, else pynvml.",
        ),
        _timeseries(
            "GPU power",
            [(queries.gpu_power(s), legend)],
            width=6,
            unit="watt",
            description="DCGM_FI_DEV_POWER_USAGE, else pynvml.",
        ),
    ]


def _pods_row(s: Scope, t: _Thresholds) -> list[Panel]:
    return [
        _stat(
            "Targets up",
            [(queries.targets_up(s), "up"), (queries.targets(s), "targets")],
            width=6,
            description="Server pods Prometheus can scrape, of those it should. SLMTargetDown fires on any 0.",
        ),
        _timeseries(
            "Pod restarts",
            [(queries.pod_restarts(s), "{{pod}}")],
            width=6,
            description="Container restarts in the last hour (kube-state-metrics).",
            minimum=0,
        ),
        _timeseries(
            "Free disk space",
            [(queries.filesystem_free(s), "{{pod}} {{mountpoint}}")],
            width=6,
            unit="percent",
            description=(
                f"Free space of the server's filesystems. SLMLowDiskSpace fires below "
                f"{t.disk_free_percent:g}% on {t.disk_mountpoint}."
            ),
            thresholds=[("red", None), ("green", t.disk_free_percent)],
        ),
        _stat(
            "Model load time",
            [(queries.model_load_seconds(s), "load")],
            width=6,
            unit="s",
            description="How long the last model load took.",
        ),
    ]


def render_dashboard(*, name: str, namespace: str, model: str, alerts: Mapping[str, Any] | None) -> dict[str, Any]:
    """The per-deployment dashboard; alert thresholds from `alerts` drawn on the matching panels."""
    s = Scope.of(name=name, namespace=namespace)
    t = _Thresholds.of(alerts)
    dashboard = _dashboard(
        uid=dashboard_uid(namespace=namespace, name=name),
        title=f"SLM / {namespace} / {name}",
        description=f"SLMDeployment {namespace}/{name} serving {model} (generated by slm-operator; edits are lost).",
        tags=[*TAGS, f"namespace:{namespace}"],
    )
    dashboard.with_variable(_datasource_variable())
    dashboard.with_variable(_query_variable("model", "Model", queries.model_variable(s), current=model))
    _assemble(
        dashboard,
        [
            ("Traffic and errors", _traffic_row(s, t)),
            ("Generation", _generation_row(s, t)),
            ("Model behaviour", _model_behaviour_row(s, t)),
            ("GPU", _gpu_row(s, t)),
            ("Pods and capacity", _pods_row(s, t)),
        ],
        RuntimeGaps.of(alerts),
    )
    return _to_json(dashboard)


# ---- the fleet dashboard ----------------------------------------------------------------------


def _fleet_row() -> list[Panel]:
    return [
        _table(
            "Deployments",
            queries.fleet_deployments(),
            width=12,
            description="Every SLMDeployment whose server Prometheus scrapes.",
        ),
        _table(
            "Firing SLM alerts",
            queries.fleet_firing_alerts(),
            width=12,
            description="Alerts of the SLM rules now firing, per deployment.",
        ).no_value("No SLM alert is firing"),
    ]


def _service_level_row() -> list[Panel]:
    legend = "{{namespace}}/{{job}}"
    return [
        _timeseries(
            "Request rate",
            [(queries.fleet_request_rate(), legend)],
            width=8,
            unit="reqps",
            description="Requests per second per deployment.",
        ),
        _timeseries(
            "Error ratio",
            [(queries.fleet_error_ratio(), legend)],
            width=8,
            unit="percentunit",
            description="Share of 5xx answers per deployment (5m).",
        ),
        _timeseries(
            "Response time p95",
            [(queries.fleet_response_time_p95(), legend)],
            width=8,
            unit="s",
            description="95th percentile request duration per deployment.",
            minimum=0,
        ),
        _timeseries(
            "Time to first token p95",
            [(queries.fleet_time_to_first_token_p95(), legend)],
            width=8,
            unit="s",
            description="95th percentile time to first token per deployment.",
            minimum=0,
        ),
        _timeseries(
            "Queue utilisation",
            [(queries.fleet_queue_utilization(), legend)],
            width=8,
            unit="percent",
            description="Queued requests as a share of each deployment's queue limit.",
        ),
        _timeseries(
            "GPU utilisation",
            [(queries.fleet_gpu_utilization(), legend)],
            width=8,
            unit="percent",
            description="Mean GPU utilisation per deployment (DCGM first, pynvml second).",
        ),
    ]


def render_fleet_dashboard() -> dict[str, Any]:
    """The fleet overview dashboard shipped by the Helm chart."""
    dashboard = _dashboard(
        uid="slm-fleet",
        title="SLM / Fleet overview",
        description="All SLMDeployments at a glance (shipped by the slm-monitoring chart).",
        tags=TAGS,
    )
    dashboard.with_variable(_datasource_variable())
    dashboard.with_variable(_query_variable("namespace", "Namespace", queries.FLEET_NAMESPACES))
    _assemble(dashboard, [("Fleet", _fleet_row()), ("Service level", _service_level_row())], RuntimeGaps.of(None))
    return _to_json(dashboard)


def iter_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, in layout order."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
