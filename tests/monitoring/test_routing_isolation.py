"""One tenant's receivers never get another namespace's alerts, whatever the Prometheus Operator's matcher strategy.

Two namespaces each run an SLMDeployment named `phi` with its own receivers. The Prometheus Operator
merges every AlertmanagerConfig into one Alertmanager configuration; under its default strategy
(`OnNamespace`) it adds `namespace="<ns>"` to each config's route and inhibit rules, under `None` (and
for the Alertmanager's own namespace under `OnNamespaceExceptForAlertmanagerNamespace`) it adds
nothing, so only our own matchers keep the tenants apart. The routing is judged by Alertmanager's
own matcher (`amtool config routes test`).

Stand-in: no Prometheus Operator process runs here, so `operator_config()` writes the configuration
it generates, transcribed from prometheus-operator v0.85 `pkg/alertmanager/amcfg.go`
(`ConfigBuilder.AddAlertmanagerConfigs`, `convertRoute`, `convertInhibitRule`, and the
`noopEnforcer` / `namespaceEnforcer` / `continueToNextRoute` enforcers) for the fields we render.
Receivers are kept by name only: routing does not read their integrations.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools.tools import tool
from slm_operator.monitoring.notifications import render_alertmanager_config_spec

NOTIFICATIONS: dict[str, Any] = {
    "slack": {"channel": "#slm-alerts", "apiURLSecretRef": {"name": "slack", "key": "url"},
              "severities": ["critical", "warning"]},
    "email": {"to": ["sre@example.com"], "from": "slm@example.com", "smarthost": "smtp.example.com:587",
              "severities": ["critical"]},
}  # fmt: skip
TENANTS = ("llm", "team-b")
STRATEGIES = ("None", "OnNamespace")


def _matcher(matcher: Mapping[str, str]) -> str:
    return f'{matcher["name"]}{matcher.get("matchType", "=")}"{matcher["value"]}"'


def _route(route: Mapping[str, Any], namespace: str, config: str) -> dict[str, Any]:
    converted: dict[str, Any] = {
        "receiver": f"{namespace}/{config}/{route['receiver']}",  # makeNamespacedString
        "matchers": [_matcher(m) for m in route.get("matchers", [])],
        "continue": bool(route.get("continue", False)),
    }
    if route.get("routes"):
        converted["routes"] = [_route(child, namespace, config) for child in route["routes"]]
    return converted


def operator_config(configs: list[tuple[str, str, dict[str, Any]]], strategy: str) -> dict[str, Any]:
    """alertmanager.yml as the Prometheus Operator generates it from [(namespace, name, spec)]."""
    namespace_enforced = strategy == "OnNamespace"
    routes, receivers, inhibit_rules = [], [{"name": "null"}], []
    for namespace, config, spec in sorted(configs):  # the operator sorts by namespace/name
        enforced = [f'namespace="{namespace}"'] if namespace_enforced else []
        for rule in spec.get("inhibitRules", []):
            source = [_matcher(m) for m in rule.get("sourceMatch", [])]
            target = [_matcher(m) for m in rule.get("targetMatch", [])]
            inhibit_rules.append(
                {
                    "source_matchers": source + [m for m in enforced if m not in source],
                    "target_matchers": target + [m for m in enforced if m not in target],
                    "equal": list(rule.get("equal", [])),
                }
            )
        route = _route(spec["route"], namespace, config)
        route["matchers"] += enforced  # namespaceEnforcer appends; noopEnforcer leaves them
        route["continue"] = True  # continueToNextRoute, whatever the strategy
        routes.append(route)
        receivers += [{"name": f"{namespace}/{config}/{r['name']}"} for r in spec["receivers"]]
    return {"route": {"receiver": "null", "routes": routes}, "receivers": receivers, "inhibit_rules": inhibit_rules}


@pytest.fixture(scope="module", params=STRATEGIES)
def config_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    configs = []
    for namespace in TENANTS:
        spec = render_alertmanager_config_spec(name="phi", namespace=namespace, notifications=NOTIFICATIONS)
        assert spec is not None
        configs.append((namespace, "phi", spec))
    path = tmp_path_factory.mktemp(f"am-{request.param}") / "alertmanager.yml"
    path.write_text(yaml.safe_dump(operator_config(configs, request.param), sort_keys=False))
    result = subprocess.run([tool("amtool"), "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return path


def _receivers(config_file: Path, labels: Mapping[str, str]) -> set[str]:
    result = subprocess.run(
        [tool("amtool"), "config", "routes", "test", f"--config.file={config_file}",
         *(f"{key}={value}" for key, value in labels.items())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return set(result.stdout.strip().split(","))


@pytest.mark.parametrize(
    ("namespace", "severity", "receivers"),
    [
        ("llm", "critical", {"llm/phi/slack", "llm/phi/email"}),
        ("llm", "warning", {"llm/phi/slack"}),
        ("team-b", "critical", {"team-b/phi/slack", "team-b/phi/email"}),
        ("team-b", "warning", {"team-b/phi/slack"}),
        ("elsewhere", "critical", {"null"}),  # a third namespace with a deployment of the same name
    ],
)
def test_an_alert_reaches_only_its_own_namespaces_receivers(
    config_file: Path, namespace: str, severity: str, receivers: set[str]
) -> None:
    labels = {"alertname": "SLMHighErrorRate", "namespace": namespace, "job": "phi", "severity": severity}
    assert _receivers(config_file, labels) == receivers


def test_inhibit_rules_carry_their_own_namespace_matcher() -> None:
    """A critical alert of llm/phi may only mute warnings of llm/phi, even with no enforcer adding a matcher."""
    spec = render_alertmanager_config_spec(name="phi", namespace="llm", notifications=NOTIFICATIONS)
    assert spec is not None
    (rule,) = operator_config([("llm", "phi", spec)], "None")["inhibit_rules"]
    assert rule == {
        "source_matchers": ['severity="critical"', 'namespace="llm"', 'job="phi"'],
        "target_matchers": ['severity="warning"', 'namespace="llm"', 'job="phi"'],
        "equal": ["namespace", "job"],
    }
