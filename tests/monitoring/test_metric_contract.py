"""Every metric name a rule or a panel reads is promised by the server's contract or a documented exporter.

The live half (the real server's /metrics) is tests/monitoring/test_dataplane.py.
"""

from __future__ import annotations

from slm_operator.monitoring.dashboards import iter_queries, render_dashboard, render_fleet_dashboard
from slm_operator.monitoring.metric_names import external_metric_names, metric_names, server_metric_names
from slm_operator.monitoring.rules import render_rule_groups, shared_rule_groups


def used_metric_names() -> dict[str, set[str]]:
    """{metric name: where it is used} over both rule layers and both dashboards (recording names left out)."""
    groups = [*shared_rule_groups(), *render_rule_groups(name="phi", namespace="llm", alerts=None)]
    places: dict[str, set[str]] = {}
    sources = [(rule.get("record") or rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]
    for dashboard in (render_dashboard(name="phi", namespace="llm", model="m", alerts=None), render_fleet_dashboard()):
        sources += [(f"panel {title!r}", expr) for title, expr in iter_queries(dashboard)]
    for where, expr in sources:
        for name in metric_names(expr):
            if ":" not in name:
                places.setdefault(name, set()).add(where)
    return places


def test_every_metric_name_is_documented() -> None:
    known = server_metric_names(with_gpu=True).union(*external_metric_names().values())
    unknown = {name: sorted(where) for name, where in used_metric_names().items() if name not in known}
    assert not unknown, f"metric names neither in the server contract nor a documented exporter: {unknown}"


def test_the_extractor_finds_names_and_skips_functions_labels_and_strings() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, endpoint) (rate(api_request_duration_seconds_bucket{job="x"}[5m])))'
        ' / on (job) group_left (model) max by (job, model) (slm_model_info{device=~"cuda.*"})'
        ' or label_replace(up{job="y"} offset 5m, "gpu", "$1", "index", "(.*)") > bool 1e-3'
    )
    assert metric_names(expr) == {"api_request_duration_seconds_bucket", "slm_model_info", "up"}


def test_a_renamed_metric_would_be_caught() -> None:
    known = server_metric_names(with_gpu=True).union(*external_metric_names().values())
    assert "slm_max_queued_requests" not in known
    assert metric_names("sum(slm_max_queued_requests)") - known == {"slm_max_queued_requests"}
