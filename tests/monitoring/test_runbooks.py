"""Every alert has a runbook at the place its runbook_url points, with the sections on-call needs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from slm_devtools.tools import tool
from slm_operator.monitoring.rules import ALERT_NAMES, DEFAULT_RUNBOOK_BASE_URL, render_rule_groups

REPO = Path(__file__).resolve().parents[2]
RUNBOOKS = REPO / "docs" / "runbooks"
SECTIONS = ["## Meaning", "## First queries", "## Likely causes", "## Fixes"]


def _queries(text: str) -> list[str]:
    block = text.split("## First queries", 1)[1].split("##", 1)[0]
    return [line.strip() for line in block.splitlines() if line.startswith("    ") and "kubectl" not in line]


@pytest.mark.parametrize("alert", ALERT_NAMES)
def test_every_alert_has_a_runbook_with_meaning_queries_causes_and_fixes(alert: str) -> None:
    path = RUNBOOKS / f"{alert}.md"
    assert path.is_file(), f"missing {path.relative_to(REPO)}"
    text = path.read_text()
    assert text.startswith(f"# {alert}\n")
    for section in SECTIONS:
        assert section in text, (alert, section)
    assert _queries(text), f"{alert}: no first queries"


def test_runbook_urls_point_at_the_runbooks() -> None:
    assert DEFAULT_RUNBOOK_BASE_URL.endswith("/docs/runbooks")
    for group in render_rule_groups(name="phi", namespace="llm", alerts=None):
        for rule in group["rules"]:
            if "alert" in rule:
                url = rule["annotations"]["runbook_url"]
                relative = url.removeprefix(DEFAULT_RUNBOOK_BASE_URL.rsplit("/docs/runbooks", 1)[0] + "/")
                assert (REPO / relative).is_file(), url


# The operator's own alerts ship with the chart (templates/operator/prometheusrule.yaml).
CHART_ALERTS = ["SLMOperatorDown", "SLMOperatorReconcileErrors", "SLMOperatorSlowReconciles"]


def test_chart_alerts_are_the_ones_listed_here() -> None:
    template = (REPO / "charts/slm-monitoring/templates/operator/prometheusrule.yaml").read_text()
    assert re.findall(r"- alert: (\w+)", template) == CHART_ALERTS


@pytest.mark.parametrize("alert", CHART_ALERTS)
def test_every_chart_alert_has_a_runbook(alert: str) -> None:
    test_every_alert_has_a_runbook_with_meaning_queries_causes_and_fixes(alert)


def test_no_stray_runbooks() -> None:
    assert {path.stem for path in RUNBOOKS.glob("*.md")} == set(ALERT_NAMES) | set(CHART_ALERTS)


def test_runbook_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = tool("promtool")
    rules = []
    for alert in [*ALERT_NAMES, *CHART_ALERTS]:
        for index, query in enumerate(_queries((RUNBOOKS / f"{alert}.md").read_text())):
            expr = re.sub(r"<(ns|name|job)>", "x", query)
            rules.append({"record": f"runbook:{alert.lower()}_{index}:check", "expr": expr})
    path = tmp_path / "runbook-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "runbooks", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
