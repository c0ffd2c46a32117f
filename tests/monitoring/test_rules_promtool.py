"""The rules through Prometheus' own checker and unit-test runner (`promtool check/test rules`).

Two layers are loaded together, as a cluster loads them: the shared recording rules from the chart's own
file (charts/slm-monitoring/rules/recording-rules.yaml, what `helm install` ships) and one deployment's
PrometheusRule groups rendered exactly as the operator renders them (defaults, and a resource that changes
every threshold, `for`, severity, window and the runbook URL), one group per file. The generated promtool
tests (tests/monitoring/promtool_cases.py) run against them, one file per alert family. A failing case
prints promtool's own diff of expected and actual alerts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools.tools import REPO_ROOT, tool
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
    "scrapeTargetMissing": {"for": "3m", "severity": "critical"},
    "faultInjectionEnabled": {"for": "2m", "severity": "critical"},
    "slo": {"availabilityPercent": 99.5, "window": "7d", "pageSeverity": "warning", "ticketSeverity": "info"},
    "disabled": ["SLMPodNotReady"],
    "runbookBaseURL": "https://runbooks.example.com/slm/",
}
VARIANTS = {"defaults": None, "non-default": NON_DEFAULT_ALERTS}
# The shared recording rules exactly as the chart ships them (tests/chart/test_rules.py holds the file to
# what slm_operator.monitoring.rules generates).
CHART_RULES = REPO_ROOT / "charts" / "slm-monitoring" / "rules" / "recording-rules.yaml"


def shared_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(CHART_RULES.read_text())["groups"]
    return groups


def with_shared(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The shared groups first, then the deployment's: the order the cases evaluate them in."""
    return [*shared_groups(), *groups]


def write_rule_files(directory: Path, groups: list[dict[str, Any]]) -> dict[str, str]:
    """One file per group (as Prometheus loads a PrometheusRule's groups); {group name: path}."""
    paths = {}
    for index, group in enumerate(groups):
        path = directory / f"{index:02d}-{group['name']}.yaml"
        path.write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False))
        paths[group["name"]] = str(path)
    return paths


@pytest.fixture(scope="module")
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    alerts = VARIANTS[request.param]  # indirect parametrization: the variant's name
    directory = tmp_path_factory.mktemp(f"rules-{request.param}")
    groups = with_shared(render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=alerts))
    paths = write_rule_files(directory, groups)
    documents = build_test_files(variant=request.param, groups=groups, rule_files=paths)
    test_files = {}
    for family, document in documents.items():
        path = directory / f"test-{family}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
        test_files[family] = path
    return {"paths": paths, "tests": test_files, "groups": groups}


@pytest.mark.parametrize("rendered", list(VARIANTS), indirect=True)
def test_promtool_check_rules_is_clean(rendered: dict[str, Any]) -> None:
    """`promtool check rules` accepts every group (syntax, duplicate names, templates) and lints clean."""
    result = subprocess.run(
        [tool("promtool"), "check", "rules", "--lint=all", "--lint-fatal", *rendered["paths"].values()],
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
    "faults",
    "slo",
    "drift-perplexity",
    "drift-output_length",
]
# Only the non-default variant disables an alert.
VARIANT_FAMILIES = [(v, f) for v in VARIANTS for f in FAMILIES] + [("non-default", "disabled")]


@pytest.mark.parametrize(("rendered", "family"), VARIANT_FAMILIES, indirect=["rendered"])
def test_promtool_rule_tests_pass(rendered: dict[str, Any], family: str) -> None:
    """Every generated case of one alert family passes under the pinned promtool."""
    path = rendered["tests"][family]
    result = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


def test_generated_cases_catch_rules_that_drifted_from_the_resource(tmp_path: Path) -> None:
    """The cases can fail: rules rendered for threshold 0.10 do not pass the cases of the defaults (0.05)."""
    groups = with_shared(render_rule_groups(name=NAME, namespace=NAMESPACE, alerts={"errorRate": {"threshold": 0.10}}))
    paths = write_rule_files(tmp_path, groups)
    document = build_test_files(variant="defaults", groups=groups, rule_files=paths)["errors"]
    path = tmp_path / "test-errors.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
    result = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "SLMHighErrorRate fires 5m after crossing its threshold" in result.stdout + result.stderr


@pytest.mark.parametrize("rendered", list(VARIANTS), indirect=True)
def test_prometheus_2_accepts_the_rules_too(rendered: dict[str, Any]) -> None:
    """Prometheus 2.x (`.bin/promtool2`, a 2.55 build) parses every group: no 3.x-only syntax slipped in."""
    result = subprocess.run(
        [tool("promtool2"), "check", "rules", *rendered["paths"].values()], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- how long a burst of errors SLMHighErrorRate tolerates ---------------------------------------------
#
# A total outage (every request a 5xx) of `burst` whole minutes starting at minute 10, with scrapes every
# 15s and rules evaluated every 30s (the Prometheus Operator's default), threshold 5% and `for: 5m`. The
# alert reads the shared per-target counters, recorded at each evaluation: the ratio at time t is over the
# 15s increments in (t - window + 30s, t], the span between the first and last recorded sample of the
# window: 18 of them for 5m, 2 for 1m; one failed increment is already 1/18 = 5.6% > 5%. So the condition
# holds from 10m30s until the last failed increment leaves the window (while t < 10m + burst + window - 30s),
# and the alert fires once it has held for 5m: with window 5m a 2-minute outage fires (from 15m30s to
# 16m), with 1m it takes 6 minutes. Expected alerts and minutes are worked out by hand in that arithmetic,
# not read from the rules.
ERROR_BURSTS = [
    # (window, burst minutes, {minute: firing alert's error ratio as the summary prints it, None: silent})
    ("5m", 1, dict.fromkeys(range(10, 18))),
    ("5m", 2, {10: None, 15: None, 16: "11.11%", 17: None}),  # 2 of 18 increments failed at minute 16
    ("5m", 3, {10: None, 15: None, 16: "33.33%", 17: "11.11%", 18: None}),  # 6/18, then 2/18
    ("1m", 3, dict.fromkeys(range(10, 20))),
    ("1m", 5, dict.fromkeys(range(10, 20))),
    ("1m", 6, {10: None, 15: None, 16: "100%", 17: None}),
]


def _expected_error_alert(window: str, ratio: str) -> dict[str, Any]:
    return {
        "exp_labels": {"namespace": "llm", "job": "phi", "severity": "critical"},
        "exp_annotations": {
            "summary": f"llm/phi: {ratio} of requests fail",
            "description": f"{ratio} of the requests to SLMDeployment llm/phi answered with a 5xx status over the "
            f"last {window} (threshold 5%).",
            "runbook_url": "https://github.com/slm-monitoring/slm-monitoring/blob/main/docs/runbooks/SLMHighErrorRate.md",
        },
    }


def _counter(increments: list[int]) -> str:
    """Every sample of a counter that starts high (rate() then never extrapolates it to below zero)."""
    values, total = [1_000_000], 1_000_000
    for increment in increments:
        total += increment
        values.append(total)
    return " ".join(str(value) for value in values)


@pytest.mark.parametrize(("window", "burst", "checks"), ERROR_BURSTS, ids=[f"{w}-{b}m" for w, b, _ in ERROR_BURSTS])
def test_the_error_rate_window_decides_which_burst_fires(
    tmp_path: Path, window: str, burst: int, checks: dict[int, str | None]
) -> None:
    """A burst shorter than `for` still fires when the rate window keeps it visible (spec...errorRate.window)."""
    groups = with_shared(render_rule_groups(name=NAME, namespace=NAMESPACE, alerts={"errorRate": {"window": window}}))
    paths = write_rule_files(tmp_path, [g for g in groups if ".drift-" not in g["name"]])
    per_minute = 4  # 15s scrapes
    healthy, after = 10 * per_minute, 15 * per_minute
    errors = [0] * healthy + [100] * (burst * per_minute) + [0] * after
    ok = [100] * healthy + [0] * (burst * per_minute) + [100] * after
    base = (
        'api_requests_total{namespace="llm",job="phi",pod="phi-6d9f8b7c5-x2k4q",container="server",'
        'endpoint="/v1/completions"'
    )
    document = {
        "rule_files": list(paths.values()),
        "evaluation_interval": "30s",
        "group_eval_order": list(paths),
        "tests": [
            {
                "name": f"window {window}: a {burst}-minute total outage",
                "interval": "15s",
                "input_series": [
                    {"series": base + ',status="200"}', "values": _counter(ok)},
                    {"series": base + ',status="500"}', "values": _counter(errors)},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": f"{minute}m",
                        "alertname": "SLMHighErrorRate",
                        "exp_alerts": [] if ratio is None else [_expected_error_alert(window, ratio)],
                    }
                    for minute, ratio in checks.items()
                ],
            }
        ],
    }
    path = tmp_path / "test-burst.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
    result = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-10000:] + result.stderr[-2000:]


# ---- what the shared layer records ---------------------------------------------------------------------


def _scrape(namespace: str, job: str, pod: str, container: str = "server") -> str:
    return f'namespace="{namespace}",job="{job}",pod="{pod}",instance="10.0.1.5:8000",container="{container}"'


def test_shared_rules_record_one_series_per_deployment_with_its_labels(tmp_path: Path) -> None:
    """Two deployments of one name in two namespaces, and another app's container, through the chart's rules.

    Each recorded series keeps `namespace` and `job` apart plus the labels its panels need; probes do not
    count as traffic; a series of a container that is not the runtime's is not recorded at all.
    """
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump({"groups": shared_groups()}, sort_keys=False))
    a, b = _scrape("llm", "phi", "phi-6d9f8b7c5-x2k4q"), _scrape("llm2", "phi", "phi-7f8c9d6b4-m3n5p")
    other = _scrape("llm", "web", "web-5c4b3a2d1-q1w2e", container="web")
    series = [
        (f'api_requests_total{{{a},endpoint="/v1/completions",status="200"}}', "1000+57x10"),
        (f'api_requests_total{{{a},endpoint="/v1/completions",status="500"}}', "1000+3x10"),
        (f'api_requests_total{{{a},endpoint="/healthz",status="503"}}', "1000+600x10"),  # a probe
        (f'api_requests_total{{{b},endpoint="/generate",status="200"}}', "5000+120x10"),
        (f'api_requests_total{{{other},endpoint="/v1/completions",status="500"}}', "0+60x10"),
    ]
    for le, step in (("0.1", 50), ("0.5", 57), ("1", 60), ("+Inf", 60)):
        series.append((f'api_request_duration_seconds_bucket{{{a},endpoint="/v1/completions",le="{le}"}}',
                       f"1000+{step}x10"))  # fmt: skip
        series.append((f'slm_time_to_first_token_seconds_bucket{{{b},endpoint="/generate",model="tiny",le="{le}"}}',
                       f"1000+{step}x10"))  # fmt: skip

    def sample(labels: str, value: float) -> dict[str, Any]:
        return {"labels": labels, "value": value}

    checks = {
        "slm:requests:rate5m": [
            sample('slm:requests:rate5m{endpoint="/generate",job="phi",namespace="llm2",status="200"}', 2),
            sample('slm:requests:rate5m{endpoint="/v1/completions",job="phi",namespace="llm",status="200"}', 0.95),
            sample('slm:requests:rate5m{endpoint="/v1/completions",job="phi",namespace="llm",status="500"}', 0.05),
        ],
        "slm:requests:pod_total": [
            sample('slm:requests:pod_total{instance="10.0.1.5:8000",job="phi",namespace="llm",'
                   'pod="phi-6d9f8b7c5-x2k4q"}', 2300),
            sample('slm:requests:pod_total{instance="10.0.1.5:8000",job="phi",namespace="llm2",'
                   'pod="phi-7f8c9d6b4-m3n5p"}', 5600),
        ],
        "slm:request_errors:pod_total": [
            sample('slm:request_errors:pod_total{instance="10.0.1.5:8000",job="phi",namespace="llm",'
                   'pod="phi-6d9f8b7c5-x2k4q"}', 1015),
            # No 5xx series yet: 0 errors, not no series.
            sample('slm:request_errors:pod_total{instance="10.0.1.5:8000",job="phi",namespace="llm2",'
                   'pod="phi-7f8c9d6b4-m3n5p"}', 0),
        ],
        "slm:request_duration_seconds_p95:rate5m": [
            sample('slm:request_duration_seconds_p95:rate5m{job="phi",namespace="llm"}', 0.5),
        ],
        "slm:request_duration_seconds_p95_by_endpoint:rate5m": [
            sample('slm:request_duration_seconds_p95_by_endpoint:rate5m{endpoint="/v1/completions",job="phi",'
                   'namespace="llm"}', 0.5),
        ],
        "slm:time_to_first_token_seconds_p95:rate5m": [
            sample('slm:time_to_first_token_seconds_p95:rate5m{job="phi",model="tiny",namespace="llm2"}', 0.5),
        ],
    }  # fmt: skip
    document = {
        "rule_files": [path.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": text, "values": values} for text, values in series],
                "promql_expr_test": [
                    {"expr": record, "eval_time": "5m", "exp_samples": samples} for record, samples in checks.items()
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
    result = subprocess.run([tool("promtool"), "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
