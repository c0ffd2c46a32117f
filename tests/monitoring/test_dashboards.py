"""Unit tests of the Grafana JSON models (no Grafana binary exists here; see DESIGN.md)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools.tools import tool
from slm_operator.monitoring.dashboards import dashboard_uid, iter_queries, render_dashboard, render_fleet_dashboard
from slm_operator.monitoring.metric_names import metric_names
from slm_operator.monitoring.rules import render_rule_groups, shared_rule_groups

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEED_PANELS = ["Request rate", "Error rate", "Response time p50 / p95", "GPU utilisation", "GPU memory used",
               "Output token distribution"]  # fmt: skip
ISSUE_PANELS = ["Time to first token", "Inter-token latency", "Tokens per second", "In-flight and queued requests",
                "Perplexity", "Output length", "Finish reasons", "Drift z-scores (PromQL baseline)",
                "Drift scores (server)", "GPU temperature", "GPU power", "Pod restarts"]  # fmt: skip
CUSTOM_ALERTS = {
    "errorRate": {"threshold": 0.2, "window": "2m"},
    "latencyP95": {"thresholdSeconds": 0.75},
    "timeToFirstToken": {"thresholdSeconds": 0.3},
    "gpuUtilization": {"thresholdPercent": 70},
    "gpuMemory": {"thresholdPercent": 85},
    "queueSaturation": {"thresholdPercent": 60},
    "diskSpace": {"minFreePercent": 20},
    "perplexityDrift": {"zScore": 5},
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return render_dashboard(name="phi", namespace="llm", model="microsoft/phi-3", alerts=None)


def _panels(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {panel["title"]: panel for panel in dashboard["panels"] if panel["type"] != "row"}


def _walk(value: Any, path: str = "") -> list[tuple[str, Any]]:
    found = [(path, value)]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _walk(item, f"{path}[{index}]")
    return found


def test_dashboard_has_the_seed_panels_and_the_issue_panels(dashboard: dict[str, Any]) -> None:
    titles = set(_panels(dashboard))
    assert set(SEED_PANELS) <= titles
    assert set(ISSUE_PANELS) <= titles
    assert _panels(dashboard)["Output token distribution"]["type"] == "heatmap"
    assert _panels(dashboard)["Output token distribution"]["targets"][0]["format"] == "heatmap"


def test_every_panel_uses_the_datasource_variable_and_no_fixed_uid(dashboard: dict[str, Any]) -> None:
    for dash in (dashboard, render_fleet_dashboard()):
        for panel in dash["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == DATASOURCE, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, panel["title"]
        for path, value in _walk(dash):
            if path.endswith(".uid") and path != ".uid":
                assert value in ("${datasource}", "-- Grafana --"), path
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"


def test_uid_is_stable_per_deployment_and_within_grafana_limits(dashboard: dict[str, Any]) -> None:
    again = render_dashboard(name="phi", namespace="llm", model="microsoft/phi-3", alerts=CUSTOM_ALERTS)
    assert dashboard["uid"] == again["uid"] == dashboard_uid(namespace="llm", name="phi")
    others = {dashboard_uid(namespace=ns, name=n) for ns, n in [("llm", "phi-2"), ("llm2", "phi"), ("l", "lm-phi")]}
    assert dashboard["uid"] not in others and len(others) == 3
    assert len(dashboard["uid"]) <= 40
    assert render_fleet_dashboard()["uid"] == "slm-fleet"


def test_model_variable_lists_the_deployments_models(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    assert model["current"]["value"] == "microsoft/phi-3"
    assert model["query"]["query"] == 'label_values(slm_model_info{namespace="llm",job="phi"}, model)'
    assert model["datasource"] == DATASOURCE
    uses_model = [title for title, expr in iter_queries(dashboard) if 'model=~"$model"' in expr]
    assert "Time to first token" in uses_model and "Perplexity" in uses_model


def test_every_query_is_scoped_to_the_deployment(dashboard: dict[str, Any]) -> None:
    for title, expr in iter_queries(dashboard):
        assert 'namespace="llm"' in expr, title
        assert 'job="phi"' in expr or 'pod=~"phi-' in expr, title


def _threshold_steps(panel: dict[str, Any]) -> list[tuple[str, float | None]]:
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", panel["title"]
    return [(step["color"], step["value"]) for step in defaults["thresholds"]["steps"]]


@pytest.mark.parametrize("alerts", [None, CUSTOM_ALERTS], ids=["defaults", "custom"])
def test_alert_thresholds_are_drawn_on_the_matching_panels(alerts: dict[str, Any] | None) -> None:
    panels = _panels(render_dashboard(name="phi", namespace="llm", model="m", alerts=alerts))
    custom = alerts or {}
    expect = {
        "Error rate": custom.get("errorRate", {}).get("threshold", 0.05),
        "Response time p50 / p95": custom.get("latencyP95", {}).get("thresholdSeconds", 2.0),
        "Time to first token": custom.get("timeToFirstToken", {}).get("thresholdSeconds", 1.0),
        "GPU utilisation": custom.get("gpuUtilization", {}).get("thresholdPercent", 90),
        "GPU memory used": custom.get("gpuMemory", {}).get("thresholdPercent", 95),
        "Queue utilisation": custom.get("queueSaturation", {}).get("thresholdPercent", 90),
    }
    for title, threshold in expect.items():
        assert ("red", float(threshold)) in _threshold_steps(panels[title]), title
    disk = custom.get("diskSpace", {}).get("minFreePercent", 10)
    assert _threshold_steps(panels["Free disk space"]) == [("red", None), ("green", float(disk))]
    z = custom.get("perplexityDrift", {}).get("zScore", 4.0)
    assert ("red", float(z)) in _threshold_steps(panels["Drift z-scores (PromQL baseline)"])


def test_layout_has_unique_ids_and_no_overlapping_panels(dashboard: dict[str, Any]) -> None:
    for dash in (dashboard, render_fleet_dashboard()):
        ids = [panel["id"] for panel in dash["panels"]]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for panel in dash["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
            area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not area & cells, panel["title"]
            cells |= area


def test_gpu_panels_read_dcgm_first_then_pynvml(dashboard: dict[str, Any]) -> None:
    (builtin,) = [group for group in shared_rule_groups() if group["name"].endswith("-builtin")]
    recorded = {rule["record"]: rule["expr"] for rule in builtin["rules"]}
    for title in ("GPU utilisation", "GPU memory used", "GPU temperature", "GPU power"):
        (expr,) = [expr for t, expr in iter_queries(dashboard) if t == title]
        (record,) = [name for name in metric_names(expr) if name.startswith("slm:")]
        source = recorded[record]
        dcgm, pynvml = source.index("DCGM_FI_DEV_"), source.index("nvidia_gpu_")
        assert dcgm < source.index("\nor on (namespace, pod)\n") < pynvml, title


@pytest.mark.parametrize("alerts", [None, CUSTOM_ALERTS, {"slo": {"window": "7d"}}], ids=["defaults", "custom", "7d"])
def test_recording_series_on_panels_are_recorded_by_the_rules(alerts: dict[str, Any] | None) -> None:
    """Every slm:* series a panel reads is recorded by the shared layer or the deployment's drift rules."""
    groups = [*shared_rule_groups(), *render_rule_groups(name="phi", namespace="llm", alerts=alerts)]
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    dashboard = render_dashboard(name="phi", namespace="llm", model="m", alerts=alerts)
    for dash in (dashboard, render_fleet_dashboard()):
        for title, expr in iter_queries(dash):
            for name in metric_names(expr):
                if ":" in name:
                    assert name in recorded, (title, name)


def test_error_panels_draw_the_alerts_own_expression() -> None:
    """The "Error rate" panel's alert line is SLMHighErrorRate's expression, over the resource's window."""
    alerts = {"errorRate": {"window": "2m"}}
    (rule,) = [rule for group in render_rule_groups(name="phi", namespace="llm", alerts=alerts)
               for rule in group["rules"] if rule.get("alert") == "SLMHighErrorRate"]  # fmt: skip
    panel = _panels(render_dashboard(name="phi", namespace="llm", model="m", alerts=alerts))["Error rate"]
    alert_line = next(t["expr"] for t in panel["targets"] if t["legendFormat"] == "all endpoints, 2m (alert)")
    assert " ".join(rule["expr"].split()) == f"( {alert_line} ) > 0.05"


def test_dashboards_are_deterministic_json(dashboard: dict[str, Any]) -> None:
    again = render_dashboard(name="phi", namespace="llm", model="microsoft/phi-3", alerts=None)
    assert json.dumps(dashboard, sort_keys=True) == json.dumps(again, sort_keys=True)
    json.dumps(render_fleet_dashboard())


def grafana_to_promql(expr: str) -> str:
    """A panel query as Grafana sends it to Prometheus: its variables and macros substituted."""
    return expr.replace("$__rate_interval", "1m").replace('"$model"', '".*"').replace('"$namespace"', '".*"')


@pytest.mark.parametrize("binary", ["promtool", "promtool2"], ids=["prometheus-3", "prometheus-2"])
def test_every_panel_query_is_valid_promql(tmp_path: Path, binary: str) -> None:
    """promtool of Prometheus 3.x and of 2.x parses every panel query (as recording rules, variables substituted)."""
    promtool = tool(binary)
    dashboards = [render_dashboard(name="phi", namespace="llm", model="m", alerts=None), render_fleet_dashboard()]
    rules = [
        {"record": f"panel:query_{index}:check", "expr": grafana_to_promql(expr)}
        for index, (_, expr) in enumerate(q for d in dashboards for q in iter_queries(d))
    ]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
