"""The rendered rules through Prometheus' own checker and unit-test runner (`promtool check/test rules`).

The rules are rendered exactly as the operator renders them (defaults, and a resource that changes
every threshold, `for`, severity, window and the runbook URL), written one group per file, and the
generated promtool tests (tests/monitoring/promtool_cases.py) run against them, one file per alert
family. A failing case prints promtool's own diff of expected and actual alerts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools.tools import ToolMissing, tool
from slm_operator.monitoring.rules import render_rule_groups

from .promtool_cases import NAME, NAMESPACE, build_test_files

# Every knob moved away from its default. Windows stay whole minutes and drift windows keep a
# one-minute evaluation interval (the generated cases simulate one-minute steps).
NON_DEFAULT_ALERTS: dict[str, Any] = {
    "errorRate": {"threshold": 0.2, "for": "3m", "severity": "warning", "window": "10m"},
    "latencyP95": {"thresholdSeconds": 0.5, "for": "10m", "severity": "critical"},
    "gpuUtilization": {"thresholdPercent": 75, "for": "5m", "severity": "info"},
    "gpuMemory": {"thresholdPercent": 80, "for": "2m", "severity": "critical"},
    "diskSpace": {"minFreePercent": 25, "mountpoint": "/models", "for": "1m", "severity": "critical"},
    "timeToFirstToken": {"thresholdSeconds": 0.25, "for": "2m", "severity": "critical"},
    "queueSaturation": {"thresholdPercent": 50, "for": "1m", "severity": "critical"},
    "perplexityDrift": {"zScore": 4, "for": "10m", "window": "30m", "baselineWindow": "12h"},
    "outputLengthDrift": {"zScore": 2.5, "for": "5m", "severity": "critical"},
    "gpuXidErrors": {"for": "2m", "severity": "warning"},
    "gpuMetricsAbsent": {"for": "5m", "severity": "critical"},
    "targetDown": {"for": "2m", "severity": "warning"},
    "podCrashLooping": {"for": "10m", "severity": "critical"},
    "podNotReady": {"for": "5m"},
    "slo": {"availabilityPercent": 99.5, "window": "7d", "pageSeverity": "warning", "ticketSeverity": "info"},
    "disabled": ["SLMPodNotReady"],
    "runbookBaseURL": "https://runbooks.example.com/slm/",
}
VARIANTS = {"defaults": None, "non-default": NON_DEFAULT_ALERTS}


def _promtool() -> str:
    try:
        return tool("promtool")
    except ToolMissing as missing:
        pytest.skip(str(missing))


def write_rule_files(directory: Path, groups: list[dict[str, Any]]) -> dict[str, str]:
    """One file per group (as Prometheus loads a PrometheusRule's groups); {group name: path}."""
    paths = {}
    for index, group in enumerate(groups):
        path = directory / f"{index:02d}-{group['name']}.yaml"
        path.write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False))
        paths[group["name"]] = str(path)
    return paths


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    alerts = VARIANTS[request.param]
    directory = tmp_path_factory.mktemp(f"rules-{request.param}")
    groups = render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=alerts)
    paths = write_rule_files(directory, groups)
    documents = build_test_files(groups=groups, alerts=alerts, rule_files=paths)
    test_files = {}
    for family, document in documents.items():
        path = directory / f"test-{family}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
        test_files[family] = path
    return {"paths": paths, "tests": test_files, "groups": groups}


def test_promtool_check_rules_is_clean(rendered: dict[str, Any]) -> None:
    """`promtool check rules` accepts every group (syntax, duplicate names, templates) and lints clean."""
    result = subprocess.run(
        [_promtool(), "check", "rules", "--lint=all", "--lint-fatal", *rendered["paths"].values()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


FAMILIES = [
    "errors",
    "latency",
    "gpu",
    "capacity",
    "availability",
    "slo",
    "drift-perplexity",
    "drift-output_length",
    "disabled",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_promtool_rule_tests_pass(rendered: dict[str, Any], family: str) -> None:
    """Every generated case of one alert family passes under the pinned promtool."""
    path = rendered["tests"].get(family)
    if path is None:
        pytest.skip(f"no {family} cases for this variant")
    result = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


def test_generated_cases_catch_rules_that_drifted_from_the_resource(tmp_path: Path) -> None:
    """The cases can fail: rules rendered for threshold 0.10 do not pass cases written for 0.05."""
    groups = render_rule_groups(name=NAME, namespace=NAMESPACE, alerts={"errorRate": {"threshold": 0.10}})
    paths = write_rule_files(tmp_path, groups)
    expected_groups = render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=None)
    document = build_test_files(groups=expected_groups, alerts=None, rule_files=paths)["errors"]
    path = tmp_path / "test-errors.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
    result = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "SLMHighErrorRate fires 5m after crossing its threshold" in result.stdout + result.stderr


def test_prometheus_2_accepts_the_rules_too(rendered: dict[str, Any]) -> None:
    """Prometheus 2.x (`.bin/promtool2`, a 2.55 build) parses every group: no 3.x-only syntax slipped in."""
    try:
        promtool2 = tool("promtool2")
    except ToolMissing as missing:
        pytest.skip(f"{missing} (optional: promtool of Prometheus 2.55, module v0.55.1)")
    result = subprocess.run(
        [promtool2, "check", "rules", *rendered["paths"].values()], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
