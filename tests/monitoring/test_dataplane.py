"""Live proof on the data plane: what the operator writes, consumed by the real Prometheus Operator.

One module-scoped plane (slm_devtools.dataplane.MonitoringPlane) on the session's cluster: an
SLMDeployment with short windows (so the test takes about two minutes) reconciled by the real operator;
the real server of its pod (tiny model, faults admin on) running at the pod's address; kube-prometheus-
stack's Prometheus and Alertmanager (`prometheus_stack`) running what the Prometheus Operator generated
from the ServiceMonitor, PrometheusRule and AlertmanagerConfig — Prometheus discovers the pod through
the API server and scrapes it every second; Alertmanager delivers to a loopback SMTP server and a
loopback Slack-style webhook. A bounded load generator keeps traffic flowing. Nothing is mocked; KWOK
fakes the pod's scheduling and status, and slm_devtools.localpods runs its process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from slm_devtools import dataplane as dp
from slm_devtools.cluster import ClusterBase
from slm_devtools.promstack import PrometheusStack
from slm_operator.monitoring.dashboards import iter_queries, render_dashboard, render_fleet_dashboard
from slm_operator.monitoring.metric_names import (
    HISTOGRAM_SUFFIXES,
    external_metric_names,
    metric_names,
    server_metric_names,
)
from slm_operator.monitoring.rules import error_ratio_expr

from .test_metric_contract import used_metric_names

pytestmark = [pytest.mark.e2e, pytest.mark.dataplane, pytest.mark.slow]

NAME, MODEL = "phi", "tiny"
INTERVAL_S = 1.0  # scrape and rule evaluation interval (the ServiceMonitor's, and the stack's)
GROUP_WAIT_S = 1.0
# Short windows and `for: 0s` so a fault alerts within seconds and resolves within ~20 s.
LIVE_ALERTS: dict[str, Any] = {
    "errorRate": {"threshold": 0.1, "for": "0s", "window": "15s"},
    # A 10s mean against 2m of history: a step change peaks near z = 7 before the baseline absorbs it.
    "perplexityDrift": {"window": "10s", "baselineWindow": "2m", "for": "0s", "zScore": 3},
    "outputLengthDrift": {"window": "10s", "baselineWindow": "2m", "for": "0s"},
}
# Series Prometheus cannot have here: no GPU (pynvml) and no DCGM exporter or kube-state-metrics.
UNAVAILABLE = server_metric_names(with_gpu=True) - server_metric_names()
UNAVAILABLE |= external_metric_names()["dcgm_exporter"] | external_metric_names()["kube_state_metrics"]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables and macros as Grafana would substitute them for this plane."""
    return expr.replace("$__rate_interval", "10s").replace('"$model"', f'"{MODEL}"').replace('"$namespace"', '".*"')


def test_prometheus_scrapes_the_pod_it_discovered_through_the_service_monitor(plane: dict[str, Any]) -> None:
    """The target comes from the ServiceMonitor the operator wrote (Endpoints of its Service), carries the
    pod's own labels, and is the real server: the series have the pod's name and IP."""
    namespace = plane["namespace"]
    (target,) = plane["prometheus"].targets(f"serviceMonitor/{namespace}/{NAME}/0")
    server: dp.SlmServer = plane["server"]
    assert target["health"] == "up"
    assert target["labels"]["job"] == NAME and target["labels"]["namespace"] == namespace
    assert target["labels"]["pod"] == server.pod.name and target["labels"]["container"] == "server"
    assert target["labels"]["instance"] == f"{server.pod.ip}:8000"
    assert "endpoint" not in target["labels"]  # dropped by the ServiceMonitor's relabelling
    up = plane["prometheus"].query(f'up{{namespace="{namespace}",job="{NAME}"}}')
    assert [(s["metric"]["pod"], s["value"][1]) for s in up] == [(server.pod.name, "1")]


def test_alertmanager_routes_by_the_configuration_generated_from_the_alertmanager_config(
        plane: dict[str, Any]) -> None:
    """Alertmanager runs the Prometheus Operator's output: the AlertmanagerConfig's receivers under
    `<namespace>/<name>/<receiver>` and its route scoped to the namespace."""
    loaded = plane["manager"].loaded_config()
    namespace = plane["namespace"]
    for receiver in ("slack", "email", "webhook"):
        assert f"name: {namespace}/{NAME}/{receiver}" in loaded
    assert f'namespace="{namespace}"' in loaded
    assert plane["manager"].url in plane["stack"].prometheus.api("alertmanagers")["activeAlertmanagers"][0]["url"]


def exposed_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in HISTOGRAM_SUFFIXES}
        names |= {sample.name for sample in family.samples}
    return names


@pytest.fixture(scope="module")
def plane(cluster: ClusterBase, prometheus_stack: PrometheusStack,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from slm_devtools.tinymodel import ensure_tiny_model

    workdir = tmp_path_factory.mktemp("dataplane")
    monitoring = dp.MonitoringPlane(
        cluster, prometheus_stack, workdir, name=NAME, model_name=MODEL, alerts=LIVE_ALERTS,
        scrape_interval=f"{INTERVAL_S:g}s", group_wait=f"{GROUP_WAIT_S:g}s",
    )  # fmt: skip
    monitoring.start(ensure_tiny_model())
    try:
        yield {
            "server": monitoring.server,
            "prometheus": monitoring.prometheus,
            "manager": monitoring.alertmanager,
            "smtp": monitoring.smtp,
            "hooks": monitoring.hooks,
            "load": monitoring.load,
            "groups": monitoring.rule_groups(),
            "shared_groups": monitoring.shared_rule_groups(),
            "namespace": monitoring.namespace,
            "stack": prometheus_stack,
            "workdir": workdir,
        }
    finally:
        monitoring.stop()


@pytest.fixture(scope="module")
def missing_from_server(plane: dict[str, Any]) -> set[str]:
    """Names rules or panels read that the server should expose but does not (the contract test fails on them)."""
    exposed = exposed_names(plane["server"].metrics_text())
    expected = set(used_metric_names()) & server_metric_names()
    return expected - exposed


def test_server_exposes_every_metric_the_rules_and_panels_read(missing_from_server: set[str]) -> None:
    """Contract: a rule or panel reading a name the real server does not expose would stay empty forever."""
    used = used_metric_names()
    assert not missing_from_server, {name: sorted(used[name]) for name in sorted(missing_from_server)}


def test_server_takes_faults_as_the_contract_says(plane: dict[str, Any]) -> None:
    """Contract: POST /admin/faults with errorRate/addedLatencySeconds/degradedOutput."""
    assert plane["server"].set_faults() == "contract"


def _wait_all_return_data(prometheus: dp.Prometheus, queries: dict[str, str], timeout: float) -> dict[str, str]:
    """{label: query} still empty after `timeout` (polled, so slow windows get their time)."""
    pending = dict(queries)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for label, query in list(pending.items()):
            if prometheus.query(query):
                del pending[label]
        if pending:
            time.sleep(1)
    return pending


# A selector that only a model on a GPU matches (slm_model_info's `device` is `cpu` here).
ON_GPU_ONLY = 'device=~"cuda'


def _sources(expr: str, records: dict[str, str]) -> set[str]:
    """Raw metric names behind `expr`, following recording rules to their own expressions; a recording
    rule that selects only GPU devices stands for itself (it has no data here whatever it reads)."""
    names: set[str] = set()
    for name in metric_names(expr):
        if name in records and ON_GPU_ONLY not in records[name]:
            names |= _sources(records[name], records)
        else:
            names.add(name)
    return names


def _skippable(expr: str, records: dict[str, str], missing: set[str]) -> bool:
    """True when `expr` cannot have data here: all its sources are GPU/DCGM/kube-state-metrics series
    (`up` only joins DCGM series to the pods) or recording rules of GPU devices only, or one is a contract
    name the server lacks (which test_server_exposes_every_metric_the_rules_and_panels_read reports on
    its own)."""
    gpu_only = {name for name, recorded in records.items() if ON_GPU_ONLY in recorded}
    names = _sources(expr, records) - {"up"}
    if ON_GPU_ONLY in expr:
        return True
    return bool(names & missing) or (bool(names) and names <= UNAVAILABLE | gpu_only)


def _records(groups: list[dict[str, Any]]) -> dict[str, str]:
    """{recorded name: expression} of rule groups as Prometheus' /api/v1/rules reports them."""
    return {rule["name"]: rule["query"] for group in groups for rule in group["rules"] if rule["type"] == "recording"}


def test_the_chart_recording_rules_are_loaded_as_the_chart_renders_them(plane: dict[str, Any]) -> None:
    """The shared recording rules come from the PrometheusRule `helm template` renders from the chart
    (templates/rules), selected by kube-prometheus-stack's Prometheus through its `release` label."""
    rendered = dp.chart_recording_rules(plane["stack"].settings.release)
    assert rendered["metadata"]["labels"]["release"] == plane["stack"].settings.release
    loaded = {group["name"]: [rule["name"] for rule in group["rules"]] for group in plane["shared_groups"]}
    assert loaded == {group["name"]: [rule["record"] for rule in group["rules"]]
                      for group in rendered["spec"]["groups"]}
    assert "slm:requests:pod_total" in loaded["slm-shared.runtime-builtin"]


def test_every_rule_of_the_deployment_reads_only_series_a_loaded_rule_records(plane: dict[str, Any]) -> None:
    """Every slm:* series a rule of the operator's PrometheusRule reads (its alerts, its drift rules) is
    recorded by a rule Prometheus has loaded: the chart's shared rules or the deployment's own. Without
    the chart's rules the error-rate, latency, burn-rate and drift alerts could never fire."""
    recorded = set(_records(plane["shared_groups"])) | set(_records(plane["groups"]))
    rules = {f"{group['name']}/{rule['name']}": rule["query"] for group in plane["groups"] for rule in group["rules"]}
    assert any(name.endswith("/SLMHighErrorRate") for name in rules), sorted(rules)
    unrecorded = {rule: sorted(n for n in metric_names(query) if n.startswith("slm:") and n not in recorded)
                  for rule, query in rules.items()}
    assert not {rule: names for rule, names in unrecorded.items() if names}
    from_shared = [rule for rule, query in rules.items() if metric_names(query) & set(_records(plane["shared_groups"]))]
    assert len(from_shared) >= len(rules) // 2, from_shared


def test_every_recording_rule_returns_data(plane: dict[str, Any], missing_from_server: set[str]) -> None:
    prometheus: dp.Prometheus = plane["prometheus"]
    stack: PrometheusStack = plane["stack"]
    loaded = [*stack.loaded_rule_groups(plane["namespace"], NAME), *plane["shared_groups"]]
    unhealthy = [rule for group in loaded for rule in group["rules"] if rule["health"] == "err"]
    assert not unhealthy, unhealthy
    # The data plane serves the built-in runtime: the other runtimes' groups have no source here.
    builtin = [group for group in plane["shared_groups"] if group["name"].endswith("runtime-builtin")]
    assert builtin, [group["name"] for group in plane["shared_groups"]]
    records = _records([*builtin, *plane["groups"]])
    # The drift z-scores need their history guard filled: 60 evaluations of a 1s-interval group.
    checked = {record: record for record, expr in records.items() if not _skippable(expr, records, missing_from_server)}
    skipped = sorted(set(records) - set(checked))
    assert len(checked) >= len(records) - 6, skipped  # only the GPU (and contract-missing) series may be absent
    empty = _wait_all_return_data(prometheus, checked, timeout=120)
    assert not empty, f"recording rules without data: {sorted(empty)} (skipped, no source here: {skipped})"


def test_every_panel_query_returns_data(plane: dict[str, Any], missing_from_server: set[str]) -> None:
    prometheus: dp.Prometheus = plane["prometheus"]
    dashboards = [
        render_dashboard(name=NAME, namespace=plane["namespace"], model=MODEL, alerts=LIVE_ALERTS),
        render_fleet_dashboard(),
    ]
    # The data plane serves the built-in runtime: what only the other runtimes' groups record (KV-cache share,
    # preemptions) has no source here (tests/monitoring/test_dashboards_runtimes.py checks it per runtime).
    builtin = [group for group in plane["shared_groups"] if group["name"].endswith("runtime-builtin")]
    records = _records([*builtin, *plane["groups"]])
    other_runtimes_only = set(_records(plane["shared_groups"])) - set(records)
    queries: dict[str, str] = {}
    skipped: list[str] = []
    for dashboard in dashboards:
        for index, (title, expr) in enumerate(iter_queries(dashboard)):
            label = f"{dashboard['uid']}: {title} #{index}"
            if (_skippable(expr, records, missing_from_server) or "ALERTS{" in expr
                    or metric_names(expr) & other_runtimes_only):  # fmt: skip
                skipped.append(label)  # GPU/kube-state-metrics panels; firing alerts (checked below)
            else:
                queries[label] = grafana_to_promql(expr)
    empty = _wait_all_return_data(prometheus, queries, timeout=120)
    panel_count = sum(1 for d in dashboards for p in d["panels"] if p["type"] != "row")
    print(f"\npanel queries: {len(queries) + len(skipped)} in {panel_count} panels; with data: "
          f"{len(queries) - len(empty)}; not checkable here: {len(skipped)} ({skipped})")  # fmt: skip
    assert not empty, f"panel queries without data: {sorted(empty)}"


def _firing(body: Any, alert: str, status: str) -> bool:
    return (
        isinstance(body, dict)
        and body.get("status") == status
        and any(a["labels"].get("alertname") == alert for a in body.get("alerts", []))
    )


def test_fault_is_notified_by_email_slack_and_webhook_then_resolved(plane: dict[str, Any]) -> None:
    """Fault injected → SLMHighErrorRate on all three receivers; fault cleared → resolved on all three."""
    server: dp.SlmServer = plane["server"]
    prometheus: dp.Prometheus = plane["prometheus"]
    smtp: dp.SmtpSink = plane["smtp"]
    hooks: dp.WebhookSink = plane["hooks"]
    alert = "SLMHighErrorRate"
    # Healthy first: traffic flowing, the alert not firing.
    error_ratio = error_ratio_expr(f'namespace="{plane["namespace"]}",job="{NAME}"', "15s")
    dp.wait_until(lambda: prometheus.query(f"({error_ratio}) == 0"), timeout=60,
                  what="error ratio 0 with traffic")  # fmt: skip

    injected = time.time()
    server.set_faults(error_rate=1.0)
    hook = hooks.wait_for(lambda r: r.path == "/hook" and _firing(r.body, alert, "firing"), 60, "webhook firing")
    slack = hooks.wait_for(lambda r: r.path == "/slack" and alert in json.dumps(r.body), 30, "slack firing")
    mail = smtp.wait_for(lambda m: alert in m.subject and "FIRING" in m.subject, 30, "e-mail firing")
    first = min(hook.at, slack.at, mail.at) - injected

    cleared = time.time()
    server.set_faults()
    resolved_hook = hooks.wait_for(
        lambda r: r.path == "/hook" and r.at > cleared and _firing(r.body, alert, "resolved"), 90, "webhook resolved"
    )
    resolved_slack = hooks.wait_for(
        lambda r: r.path == "/slack" and r.at > cleared and "RESOLVED" in json.dumps(r.body), 30, "slack resolved"
    )
    resolved_mail = smtp.wait_for(lambda m: m.at > cleared and "RESOLVED" in m.subject, 30, "e-mail resolved")

    # Content a person on call reads.
    (fired,) = [a for a in hook.body["alerts"] if a["labels"]["alertname"] == alert]
    namespace = plane["namespace"]
    assert fired["labels"]["namespace"] == namespace and fired["labels"]["job"] == NAME
    assert fired["labels"]["severity"] == "critical"
    assert fired["annotations"]["runbook_url"].endswith(f"/{alert}.md")
    assert f"{namespace}/{NAME}" in fired["annotations"]["description"]
    attachment = slack.body["attachments"][0]
    assert slack.body["channel"] == "#slm-alerts"
    assert attachment["title"].startswith("[FIRING:") and f"{alert} {namespace}/{NAME}" in attachment["title"]
    assert "Runbook:" in attachment["text"]
    assert mail.recipients == ["sre@example.com"] and f"{alert} {namespace}/{NAME}" in mail.subject
    assert fired["annotations"]["summary"] in mail.text()

    # Latency against its floor: scrape + evaluation + for (0s) + group_wait.
    floor = INTERVAL_S + INTERVAL_S + 0 + GROUP_WAIT_S
    resolve = min(resolved_hook.at, resolved_slack.at, resolved_mail.at) - cleared
    report = {
        "fault_to_first_notification_s": round(first, 2),
        "floor_s": floor,
        "over_floor_s": round(first - floor, 2),
        "per_receiver_s": {
            k: round(v.at - injected, 2) for k, v in (("webhook", hook), ("slack", slack), ("email", mail))
        },
        "clear_to_resolved_s": round(resolve, 2),
        "error_rate_window_s": 15,  # resolution waits for errors to thin out of this window
    }
    print("\nnotification latency:", json.dumps(report))
    (plane["workdir"] / "latency.json").write_text(json.dumps(report))
    # Rate windows need two scrapes of the new 5xx series, so allow a few intervals over the floor.
    assert first <= floor + 10, report


def test_garbage_outputs_fire_the_perplexity_drift_alert(plane: dict[str, Any]) -> None:
    """Degraded output (tokens sampled uniformly) moves perplexity far from its baseline: the PromQL z-score alerts."""
    server: dp.SlmServer = plane["server"]
    prometheus: dp.Prometheus = plane["prometheus"]
    zscore = f'abs(slm:request_perplexity:zscore10s{{job="{NAME}"}})'
    # A settled baseline first (history guard met, no drift now).
    dp.wait_until(lambda: prometheus.query(f"{zscore} < 2"), timeout=120, interval=0.5, what="settled z-score")
    before = prometheus.query(f'slm:request_perplexity:mean10s{{job="{NAME}"}}')
    server.set_faults(degraded_output=True)
    try:
        fired = dp.wait_until(
            lambda: prometheus.query(f'ALERTS{{alertname="SLMPerplexityDrift",alertstate="firing",job="{NAME}"}}'),
            timeout=60, interval=0.5, what="SLMPerplexityDrift firing",
        )  # fmt: skip
        after = prometheus.query(f'slm:request_perplexity:mean10s{{job="{NAME}"}}')
    finally:
        server.set_faults()
    assert fired[0]["metric"]["model"] == MODEL
    assert float(after[0]["value"][1]) > float(before[0]["value"][1])
