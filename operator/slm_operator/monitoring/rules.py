"""Prometheus rules of SLM deployments (owned by the monitoring-as-code work), in two layers.

The rules are data (`data/rules.yaml`). `shared_rule_groups()` expands its runtime table into the recording
rules the chart ships once for the whole cluster (scripts/chart_rules.py writes them into the chart);
`render_rule_groups()` fills the per-deployment alerts' `${placeholders}` from the merged
`spec.monitoring.alerts` and returns the `spec.groups` of one SLMDeployment's PrometheusRule, which read
only what the shared layer records. Nothing is text-templated as a whole document, so Prometheus' own
`{{ $labels }}` templates and PromQL braces stay untouched.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any

from slm_operator.monitoring import load_data
from slm_operator.monitoring.defaults import merged_alerts

# Where `runbook_url` points when spec.monitoring.alerts.runbookBaseURL is empty: the runbooks in this
# repository (docs/runbooks/<AlertName>.md).
DEFAULT_RUNBOOK_BASE_URL = "https://github.com/slm-monitoring/slm-monitoring/blob/main/docs/runbooks"

# Routes that are not user traffic (probes, scrapes, fault injection) and must not dilute error ratios.
NON_TRAFFIC_ENDPOINTS = "/metrics|/healthz|/readyz|/admin/.*"

# The drift history guard asks for this share of the baseline window to be covered by evaluations.
DRIFT_MIN_HISTORY_SHARE = 0.5
# Stddev floor of the drift z-score: a share of the baseline mean, and an absolute minimum.
DRIFT_STDDEV_FLOOR_RATIO = 0.05
DRIFT_STDDEV_FLOOR_ABS = 1e-3
# The burn-rate windows in data/rules.yaml are written for this SLO window.
SLO_REFERENCE_WINDOW_SECONDS = 30 * 86400
# Scaled burn-rate windows never go below this: shorter windows hold too few scrapes for rate().
MIN_BURN_WINDOW_SECONDS = 60

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION_RE = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_PLACEHOLDER_RE = re.compile(r"\$\{(\w+)\}")


def parse_duration(text: str | int | float) -> float:
    """Seconds in a Prometheus duration ("1h30m", "5m", "0s"); plain numbers are seconds."""
    if isinstance(text, int | float):
        return float(text)
    text = text.strip()
    if not text:
        raise ValueError("empty duration")
    if text == "0":  # Prometheus' one unit-less duration (the CRD accepts it too)
        return 0.0
    pos = 0
    total = 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """The shortest Prometheus duration for `seconds` (whole seconds): 3600 -> "1h", 70 -> "1m10s"."""
    remaining = round(seconds)
    if remaining == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _number(value: float) -> str:
    """A threshold as PromQL reads it, without float noise: 0.05 -> "0.05", 90.0 -> "90"."""
    return format(float(value), ".12g")


def fill(text: str, values: Mapping[str, Any]) -> str:
    """Replace every `${key}` in `text`; an unknown key is a bug in rules.yaml, so it raises."""

    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"rules.yaml uses ${{{key}}} but no value is given for it")
        return str(values[key])

    return _PLACEHOLDER_RE.sub(replace, text)


def _fill_deep(value: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return fill(value, values)
    if isinstance(value, dict):
        return {key: _fill_deep(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill_deep(item, values) for item in value]
    return value


def _load_rules_data() -> dict[str, Any]:
    return load_data("rules.yaml")


def rules_data() -> dict[str, Any]:
    """A copy of data/rules.yaml as loaded (for tests and docs)."""
    return copy.deepcopy(_load_rules_data())


# ---- the shared layer ---------------------------------------------------------------------------------

# Keys of a row of `recording` in rules.yaml that are not a runtime's cell.
DEFAULT_RUNTIME = "builtin"
SIDECAR = "sidecar"  # the rules table's key (and row cell) of what the monitoring sidecar records
_ROW_KEYS = {"record", "by", "any", "signal", "why_not", SIDECAR}
# A recorded series' name as an expression reads it (the drift rules' own series are `slm:${what}...`).
_RECORDED_RE = re.compile(r"\bslm:[a-z0-9_]+:[a-z0-9_]+")
SHARED_GROUP_PREFIX = "slm-shared.runtime-"
SIDECAR_GROUP = "slm-shared.sidecar"


def runtime_names() -> tuple[str, ...]:
    """The runtimes of the recording rules' table, in the order of data/rules.yaml."""
    return tuple(_load_rules_data()["runtimes"])


def shared_cell(row: Mapping[str, Any], runtime: str) -> str | None:
    """The PromQL of `row` for `runtime` as written (its own cell, else the `any` cell); None: lacks it."""
    cell = row.get(runtime, row.get("any"))
    return None if cell is None else str(cell)


def sidecar_runtimes() -> frozenset[str]:
    """The runtimes whose pods run the monitoring sidecar, whose `sidecar` cells count as theirs."""
    return frozenset(_load_rules_data()[SIDECAR]["runtimes"])


def _check_table(data: Mapping[str, Any]) -> None:
    runtimes = set(data["runtimes"])
    served = set(data[SIDECAR]["runtimes"])
    if served - runtimes:
        raise ValueError(f"rules.yaml: the sidecar serves unknown runtimes {sorted(served - runtimes)}")
    for row in data["recording"]:
        unknown = set(row) - _ROW_KEYS - runtimes
        if unknown:
            raise ValueError(f"rules.yaml: {row['record']} has cells for unknown runtimes {sorted(unknown)}")
        twice = sorted(served & set(row)) + (["any"] if "any" in row else [])
        if SIDECAR in row and twice:
            raise ValueError(f"rules.yaml: {row['record']} has a sidecar cell and cells for {twice}, which would "
                             "record the same series twice")


def shared_rule_groups() -> list[dict[str, Any]]:
    """The shared recording rules: one group per runtime of data/rules.yaml, for the whole cluster.

    The chart ships them (charts/slm-monitoring/rules/recording-rules.yaml, scripts/chart_rules.py); the
    per-deployment alerts and the dashboards read what they record.
    """
    data = _load_rules_data()
    _check_table(data)
    groups = []
    for runtime, settings in data["runtimes"].items():
        values = {"non_traffic": NON_TRAFFIC_ENDPOINTS, **settings.get("values", {})}
        values["target"] = fill(str(settings["target"]), values)
        values["traffic"] = fill(str(settings["traffic"]), values)
        rules = []
        for row in data["recording"]:
            cell = shared_cell(row, runtime)
            if cell is not None:
                rules.append({"record": row["record"], "expr": fill(cell, values)})
        groups.append({"name": f"{SHARED_GROUP_PREFIX}{runtime}", "rules": rules})
    values = {"target": str(data[SIDECAR]["target"])}
    groups.append({"name": SIDECAR_GROUP, "rules": [
        {"record": row["record"], "expr": fill(str(row[SIDECAR]), values)}
        for row in data["recording"] if SIDECAR in row
    ]})
    return groups


def shared_records() -> tuple[str, ...]:
    """Every series name the shared layer records (for any runtime), in the order of data/rules.yaml."""
    return tuple(row["record"] for row in _load_rules_data()["recording"])


def runtime_records(runtime: str) -> frozenset[str]:
    """The series the shared group of `runtime` records."""
    _check_runtime(runtime)
    fed_by_sidecar = runtime in sidecar_runtimes()
    return frozenset(
        row["record"] for row in _load_rules_data()["recording"]
        if shared_cell(row, runtime) is not None or (fed_by_sidecar and SIDECAR in row)
    )


def sidecar_records() -> frozenset[str]:
    """The series the monitoring sidecar's group (`slm-shared.sidecar`) records, for every runtime it serves."""
    return frozenset(row["record"] for row in _load_rules_data()["recording"] if SIDECAR in row)


def _check_runtime(runtime: str) -> None:
    if runtime not in _load_rules_data()["runtimes"]:
        raise ValueError(f"unknown runtime {runtime!r}: expected one of {', '.join(runtime_names())}")


def _alert_reads() -> dict[str, set[str]]:
    """{alert: the shared layer's series its expression reads}, for every alert rules.yaml can render."""
    data = _load_rules_data()
    reads: dict[str, set[str]] = {}
    error_ratio = set(_RECORDED_RE.findall(data["error_ratio"]))
    for spec in [*data["alerts"], *data["runtime_alerts"]]:
        names = set(_RECORDED_RE.findall(spec["expr"]))
        if "${error_ratio}" in spec["expr"]:
            names |= error_ratio
        reads.setdefault(spec["alert"], set()).update(names)
    for burn in data["burn_rates"]:
        reads.setdefault(burn["alert"], set()).update(error_ratio)
    for drift in data["drift"]:
        reads.setdefault(drift["alert"], set()).update(_RECORDED_RE.findall(drift["mean"]))
    return reads


def _why_missing(runtime: str, row: Mapping[str, Any]) -> str:
    """Why `runtime` has no cell in `row`: its mapping's reason for the row's signal, else the row's own."""
    signal = row.get("signal", "")
    if runtime == DEFAULT_RUNTIME or runtime not in RUNTIME_METRICS_RUNTIMES:
        reason = _load_rules_data()["runtimes"][runtime].get("missing", {}).get(signal)
    else:
        entry = load_data("runtime_metrics.yaml")["runtimes"][runtime]["metrics"].get(signal, {})
        reason = entry.get("missing")
    if reason is None:
        reason = row.get("why_not") or f"no {signal or row['record']} series"
    return " ".join(str(reason).split())


# The runtimes whose native series data/runtime_metrics.yaml maps (the built-in server's are its own contract).
RUNTIME_METRICS_RUNTIMES = ("vllm", "sglang", "tgi", "llamacpp")


def unrendered_alerts(runtime: str) -> dict[str, list[dict[str, str]]]:
    """{alert: [{series, signal, reason}]}: the alerts not rendered for `runtime`, and why.

    An alert is rendered only when the shared group of the runtime records every series its expression
    reads; otherwise it could never fire. The reason is the runtime's own (data/runtime_metrics.yaml, or
    the built-in server's `missing` in rules.yaml), for the operator's status condition and the docs.
    """
    records = runtime_records(runtime)
    rows = {row["record"]: row for row in _load_rules_data()["recording"]}
    result: dict[str, list[dict[str, str]]] = {}
    for alert, reads in _alert_reads().items():
        lacking = sorted(reads - records)
        if lacking:
            result[alert] = [
                {
                    "series": name,
                    "signal": str(rows[name].get("signal", "")),
                    "reason": _why_missing(runtime, rows[name]),
                }
                for name in lacking
            ]
    return result


def runtime_alert_names() -> tuple[str, ...]:
    """The alerts on signals only some runtimes have (KV cache, preemptions); alerts.disabled may name them too."""
    return tuple(dict.fromkeys(spec["alert"] for spec in _load_rules_data()["runtime_alerts"]))


def error_ratio_expr(sel: str, window: str) -> str:
    """The share of 5xx answers over `window` among the series matching `sel`, from the shared counters.

    The alerts (SLMHighErrorRate, the burn rates) and the dashboard's error panels use this same text.
    """
    return fill(_load_rules_data()["error_ratio"], {"sel": sel, "window": window})


def alert_names() -> tuple[str, ...]:
    """Every alert name the rules can render, in the order of data/rules.yaml (none disabled)."""
    data = _load_rules_data()
    names = [spec["alert"] for spec in data["alerts"]]
    names += [burn["alert"] for burn in data["burn_rates"]]
    names += [drift["alert"] for drift in data["drift"]]
    return tuple(dict.fromkeys(names))


# Derived, never kept by hand: the CRD's `alerts.disabled` enum and the runbooks must list the same names
# (tests/operator/test_crd.py and tests/monitoring/test_runbooks.py hold them to it).
ALERT_NAMES = alert_names()


def selectors(*, name: str, namespace: str) -> dict[str, str]:
    """The label matchers that scope every rule and panel to SLMDeployment `namespace/name`."""
    sel = f'namespace="{namespace}",job="{name}"'
    return {
        "sel": sel,
        "req": f'{sel},endpoint!~"{NON_TRAFFIC_ENDPOINTS}"',
        "ns": f'namespace="{namespace}"',
        # kube-state-metrics' series of the Deployment the operator names after the SLMDeployment.
        "deployment": f'namespace="{namespace}",deployment="{name}"',
        # Pods of the Deployment named <name>: <name>-<pod-template-hash>-<random>; the two trailing
        # segments keep a deployment named "phi" from matching the pods of "phi-mini". The name is a
        # DNS-1035 label (CRD rule), so it holds no regex metacharacter; re.escape would write `\-`,
        # which PromQL's double-quoted strings reject.
        "pods": f'namespace="{namespace}",pod=~"{name}-[a-z0-9]+-[a-z0-9]+"',
        "name": name,
    }


def runbook_url(alerts: Mapping[str, Any], alert: str) -> str:
    base = str(alerts.get("runbookBaseURL") or DEFAULT_RUNBOOK_BASE_URL).rstrip("/")
    return f"{base}/{alert}.md"


def burn_rate_windows(alerts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The burn-rate alert definitions with windows and `for` scaled to alerts.slo.window."""
    scale = parse_duration(alerts["slo"]["window"]) / SLO_REFERENCE_WINDOW_SECONDS
    scaled = []
    for entry in _load_rules_data()["burn_rates"]:
        long_s = max(MIN_BURN_WINDOW_SECONDS, parse_duration(entry["long"]) * scale)
        short_s = max(MIN_BURN_WINDOW_SECONDS, parse_duration(entry["short"]) * scale)
        scaled.append(
            {
                **entry,
                "long": format_duration(long_s),
                "short": format_duration(short_s),
                "for": format_duration(parse_duration(entry["for"]) * scale),
            }
        )
    return scaled


def drift_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Window, baseline, group interval and history guard of one drift alert's rules."""
    window_s = parse_duration(config["window"])
    baseline_s = parse_duration(config["baselineWindow"])
    # 15 evaluations per window, at most one a minute: enough points for a stable stddev, and
    # the interval is fixed so `count_over_time` counts a known number of them.
    interval_s = max(1, min(60, round(window_s / 15)))
    min_samples = max(2, math.ceil(DRIFT_MIN_HISTORY_SHARE * baseline_s / interval_s))
    return {
        "window": format_duration(window_s),
        "baseline": format_duration(baseline_s),
        "interval": format_duration(interval_s),
        "min_samples": min_samples,
    }


def _alert_rule(
    *,
    alert: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
    extra_labels: Mapping[str, str],
    alerts: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "alert": alert,
        "expr": expr,
        "for": for_,
        "labels": {**extra_labels, "severity": severity},
        "annotations": {
            "summary": " ".join(summary.split()),
            "description": " ".join(description.split()),
            "runbook_url": runbook_url(alerts, alert),
        },
    }


def _indent(expr: str, by: str = "  ") -> str:
    """`expr`'s continuation lines indented to sit inside the parentheses rules.yaml puts it in."""
    return expr.replace("\n", "\n" + by)


def _threshold_values(config: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            values[key] = _number(value)
        elif isinstance(value, str):
            values[key] = value
    if "threshold" in config:
        values["threshold_percent"] = _number(float(config["threshold"]) * 100)
    return values


def render_rule_groups(
    *, name: str, namespace: str, alerts: Mapping[str, Any] | None, runtime: str = DEFAULT_RUNTIME
) -> list[dict[str, Any]]:
    """The `groups` of the PrometheusRule for SLMDeployment `namespace/name`: its alerts and drift rules.

    `alerts` is `spec.monitoring.alerts` as written (may be partial or None); defaults come from
    slm_operator.monitoring.defaults. Series of this deployment carry job=<name>, namespace=<namespace>.
    The groups read the series of `shared_rule_groups()`, which must be loaded by the same Prometheus.
    An alert reading a series the shared group of `runtime` does not record is left out
    (`unrendered_alerts(runtime)` says which and why); so is a drift group whose mean it cannot compute.
    """
    merged = merged_alerts(dict(alerts) if alerts is not None else None)
    data = _load_rules_data()
    skipped = set(unrendered_alerts(runtime))
    disabled = set(merged.get("disabled") or []) | skipped
    base = selectors(name=name, namespace=namespace)

    burns = burn_rate_windows(merged)

    alert_rules: list[dict[str, Any]] = []
    for spec in [*data["alerts"], *data["runtime_alerts"]]:
        if spec["alert"] in disabled:
            continue
        config = {**spec.get("defaults", {}), **merged.get(spec["config"], {})}
        values = {**base, **_threshold_values(config)}
        if "window" in config:
            values["window"] = format_duration(parse_duration(config["window"]))
            values["error_ratio"] = _indent(error_ratio_expr(base["sel"], values["window"]))
        alert_rules.append(
            _alert_rule(
                alert=spec["alert"],
                expr=fill(spec["expr"], values),
                for_=str(config["for"]),
                severity=str(config["severity"]),
                summary=fill(spec["summary"], values),
                description=fill(spec["description"], values),
                extra_labels=_fill_deep(spec.get("labels", {}), values),
                alerts=merged,
            )
        )

    slo = merged["slo"]
    budget = 1 - float(slo["availabilityPercent"]) / 100
    template = data["burn_rate_alert"]
    for burn in burns:
        if burn["alert"] in disabled:
            continue
        values = {
            **base,
            "long": burn["long"],
            "short": burn["short"],
            "error_ratio_long": _indent(error_ratio_expr(base["sel"], burn["long"])),
            "error_ratio_short": _indent(error_ratio_expr(base["sel"], burn["short"])),
            "factor": _number(burn["factor"]),
            "budget": _number(budget),
            "slo_window": str(slo["window"]),
            "availability": _number(slo["availabilityPercent"]),
        }
        alert_rules.append(
            _alert_rule(
                alert=burn["alert"],
                expr=fill(template["expr"], values),
                for_=burn["for"],
                severity=str(slo[burn["severity"]]),
                summary=fill(template["summary"], values),
                description=fill(template["description"], values),
                extra_labels=_fill_deep(template["labels"], values),
                alerts=merged,
            )
        )

    groups: list[dict[str, Any]] = [{"name": f"slm-{name}.alerts", "rules": alert_rules}]
    for drift in data["drift"]:
        if drift["alert"] in skipped:
            continue
        config = merged[drift["config"]]
        settings = drift_settings(config)
        groups.append(
            _drift_group(
                name=name,
                base=base,
                drift=drift,
                config=config,
                settings=settings,
                alerts=merged,
                enabled=drift["alert"] not in disabled,
            )
        )
    return groups


def drift_series(alerts: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    """{signal: {mean, avg, stddev, zscore: recorded series name}} of each drift signal under `alerts`."""
    merged = merged_alerts(dict(alerts) if alerts is not None else None)
    data = _load_rules_data()
    series = {}
    for drift in data["drift"]:
        settings = drift_settings(merged[drift["config"]])
        values = {"what": drift["what"], "window": settings["window"], "baseline": settings["baseline"]}
        series[drift["signal"]] = {key: fill(name, values) for key, name in data["drift_series"].items()}
    return series


def _drift_group(
    *,
    name: str,
    base: Mapping[str, str],
    drift: Mapping[str, Any],
    config: Mapping[str, Any],
    settings: Mapping[str, Any],
    alerts: Mapping[str, Any],
    enabled: bool,
) -> dict[str, Any]:
    data = _load_rules_data()
    values: dict[str, Any] = {
        **base,
        **_threshold_values(config),
        "what": drift["what"],
        "window": settings["window"],
        "baseline": settings["baseline"],
        "z": _number(config["zScore"]),
        "min_samples": settings["min_samples"],
        "floor_ratio": _number(DRIFT_STDDEV_FLOOR_RATIO),
        "floor_abs": _number(DRIFT_STDDEV_FLOOR_ABS),
    }
    values.update({key: fill(series, values) for key, series in data["drift_series"].items()})
    rules: list[dict[str, Any]] = [
        {"record": values["mean"], "expr": fill(drift["mean"], values)},
        *(_fill_deep(rule, values) for rule in data["drift_rules"]),
    ]
    if enabled:
        rules.append(
            _alert_rule(
                alert=drift["alert"],
                expr=fill(data["drift_alert"]["expr"], values),
                for_=str(config["for"]),
                severity=str(config["severity"]),
                summary=fill(drift["summary"], values),
                description=fill(drift["description"], values),
                extra_labels={},
                alerts=alerts,
            )
        )
    return {"name": f"slm-{name}.drift-{drift['signal']}", "interval": settings["interval"], "rules": rules}
