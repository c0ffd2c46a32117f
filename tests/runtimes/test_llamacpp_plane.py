"""llama.cpp on the data plane: the real llama-server, started with exactly the arguments the operator
renders, scraped by the real Prometheus that evaluates the chart's shared recording rules and the
deployment's alerts rendered for llama.cpp (slm_devtools.runtimeplane). What a dashboard panel can show
for llama.cpp shows data, and an alert fires when the server really goes away."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slm_devtools.dataplane import wait_until
from slm_devtools.gguf import ensure_tiny_gguf
from slm_devtools.runtimeplane import RuntimePlane
from slm_devtools.tools import tool
from slm_operator.monitoring.dashboards import iter_queries, render_dashboard, render_fleet_dashboard
from slm_operator.monitoring.metric_names import metric_names
from slm_operator.monitoring.rules import rules_data, runtime_records, sidecar_records

pytestmark = [pytest.mark.dataplane, pytest.mark.slow]

NAME, NAMESPACE, MODEL = "phi", "llm", "tiny"
# The server going away must alert at once here (the CRD's default `for` is 5m).
ALERTS = {"targetDown": {"for": "0s"}}
# No GPU on this machine: the GPU rows (DCGM's series) have nothing to read.
GPU_ROWS = {row["record"] for row in rules_data()["recording"] if row.get("signal") == "gpu"}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimePlane]:
    gguf = ensure_tiny_gguf(log=lambda *_: None)
    running = RuntimePlane("llamacpp", str(gguf), tmp_path_factory.mktemp("llamacpp-plane"), name=NAME,
                           namespace=NAMESPACE, served_model_name=MODEL, alerts=ALERTS).start()  # fmt: skip
    try:
        yield running
    finally:
        running.stop()


def query(plane: RuntimePlane, expr: str) -> list[dict[str, Any]]:
    assert plane.prometheus is not None
    return plane.prometheus.api.query(expr)


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables and macros as Grafana would substitute them for this plane."""
    return expr.replace("$__rate_interval", "10s").replace('"$model"', f'"{MODEL}"').replace('"$namespace"', '".*"')


def test_the_server_runs_the_rendered_arguments_and_prometheus_scrapes_it(plane: RuntimePlane) -> None:
    assert plane.server is not None and plane.server.process is not None
    assert plane.server.process.args == [tool("llama-server"), *plane.container["args"]]
    assert plane.container["args"][:2] == ["--model", plane.model] and "--metrics" in plane.container["args"]
    up = wait_until(lambda: query(plane, f"up{{{plane.selector()}}} == 1"), timeout=60, what="target up")
    assert up[0]["metric"]["container"] == "llamacpp" and up[0]["metric"]["pod"] == plane.pod


def test_every_series_the_llamacpp_group_records_has_data(plane: RuntimePlane) -> None:
    """Under load, each slm:* series the shared rules record from llama.cpp's own series (GPU ones aside) has a sample,
    the token rates and the decoding time are positive, and no rule of either layer failed."""
    # The llama.cpp group's own rows: this plane runs llama-server alone, without the monitoring sidecar
    # whose rows (perplexity, fault injection) the `slm-shared.sidecar` group records.
    wanted = sorted(runtime_records("llamacpp") - sidecar_records() - GPU_ROWS)
    assert wanted == sorted({"slm:inter_token_latency_seconds:mean5m", "slm:requests_running:sum",
                             "slm:requests_waiting:sum", "slm:prompt_tokens:rate5m",
                             "slm:generated_tokens:rate5m"})  # fmt: skip

    def all_present() -> dict[str, float] | None:
        values = {}
        for record in wanted:
            result = query(plane, f"{record}{{{plane.selector()}}}")
            if not result:
                return None
            values[record] = float(result[0]["value"][1])
        return values if values["slm:generated_tokens:rate5m"] > 0 else None

    values = wait_until(all_present, timeout=120, interval=1, what="every llama.cpp series recorded")
    assert values["slm:prompt_tokens:rate5m"] > 0
    assert 0 < values["slm:inter_token_latency_seconds:mean5m"] < 10
    assert plane.load is not None and plane.load.sent > 0 and plane.load.failed == 0
    assert plane.prometheus is not None
    unhealthy = [(r["name"], r.get("lastError")) for r in plane.prometheus.api.rule_health() if r["health"] == "err"]
    assert unhealthy == []


def test_every_panel_query_llamacpp_can_answer_returns_data(plane: RuntimePlane) -> None:
    answerable_names = (runtime_records("llamacpp") - GPU_ROWS) | {"up"}
    queries = [*iter_queries(render_dashboard(name=NAME, namespace=NAMESPACE, model=MODEL, alerts=ALERTS)),
               *iter_queries(render_fleet_dashboard())]  # fmt: skip
    answerable = [(title, expr) for title, expr in queries if metric_names(expr) <= answerable_names]
    assert len(answerable) >= 2, answerable  # at least the targets up and their count
    # Wait for the recording rules once, then every panel at the same moment.
    wait_until(lambda: query(plane, f"slm:generated_tokens:rate5m{{{plane.selector()}}} > 0"), timeout=120,
               interval=1, what="llama.cpp token rate recorded")  # fmt: skip
    empty = [title for title, expr in answerable if not query(plane, grafana_to_promql(expr))]
    assert empty == []


def test_the_target_down_alert_fires_when_the_server_goes_away(plane: RuntimePlane) -> None:
    """Last: stops the server. SLMTargetDown (rendered for llama.cpp) fires with the pod's labels."""
    assert plane.prometheus is not None and plane.server is not None and plane.load is not None
    plane.load.stop()
    assert not [a for a in plane.prometheus.api.alerts() if a["labels"]["alertname"] == "SLMTargetDown"]
    plane.server.stop()

    def firing() -> list[dict[str, Any]]:
        assert plane.prometheus is not None
        return [a for a in plane.prometheus.api.alerts()
                if a["labels"]["alertname"] == "SLMTargetDown" and a["state"] == "firing"]  # fmt: skip

    (alert,) = wait_until(firing, timeout=60, interval=0.5, what="SLMTargetDown firing")
    assert alert["labels"]["namespace"] == NAMESPACE and alert["labels"]["job"] == NAME
    assert alert["labels"]["pod"] == plane.pod and alert["labels"]["severity"] == "critical"
    assert "metrics endpoint unreachable" in alert["annotations"]["summary"]
    assert Path(plane.workdir / "llamacpp.log").exists()
