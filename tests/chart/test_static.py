"""The chart's own files: lint, generated files in step, values documented and schema-checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chartlib import CHART, CI_VALUES, REPO_ROOT, helm, render

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def test_helm_lint_strict_passes_with_defaults_and_every_ci_values_file() -> None:
    helm("lint", "--strict", str(CHART))
    for values in CI_VALUES:
        helm("lint", "--strict", str(CHART), "--values", str(values))


def test_there_are_ci_values_files_for_the_optional_features() -> None:
    assert {p.name for p in CI_VALUES} >= {"full-values.yaml", "namespaced-values.yaml", "minimal-values.yaml"}


@pytest.mark.parametrize(
    "command",
    [
        ["scripts/sync-crds.sh", "--check"],
        [sys.executable, "scripts/chart_readme.py", "--check"],
        [sys.executable, "scripts/chart_dashboards.py", "--check"],
    ],
    ids=["crds", "readme", "fleet-dashboard"],
)
def test_generated_chart_files_are_in_step_with_their_source(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr + result.stdout


def test_crd_check_fails_when_the_chart_copy_drifts(tmp_path: Path) -> None:
    """The check can fail: a copy of the repository layout with an edited chart CRD is refused."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "sync-crds.sh").write_bytes((REPO_ROOT / "scripts" / "sync-crds.sh").read_bytes())
    (tmp_path / "scripts" / "sync-crds.sh").chmod(0o755)
    source = tmp_path / "manifests" / "crds"
    source.mkdir(parents=True)
    for crd in (REPO_ROOT / "manifests" / "crds").glob("*.yaml"):
        (source / crd.name).write_text(crd.read_text())
    run = [str(tmp_path / "scripts" / "sync-crds.sh")]
    subprocess.run(run, check=True, capture_output=True, timeout=60)
    assert subprocess.run([*run, "--check"], capture_output=True, timeout=60).returncode == 0
    chart_copy = next((tmp_path / "charts" / "slm-monitoring" / "crds").glob("*.yaml"))
    chart_copy.write_text(chart_copy.read_text() + "# edited by hand\n")
    assert subprocess.run([*run, "--check"], capture_output=True, timeout=60).returncode == 1


def test_chart_ships_the_crd_of_manifests() -> None:
    names = {p.name for p in (CHART / "crds").glob("*.yaml")}
    assert "slm.dev_slmdeployments.yaml" in names


def test_fleet_dashboard_is_a_dashboard_with_a_datasource_variable() -> None:
    dashboard = json.loads((CHART / "dashboards" / "fleet.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["panels"], list)
    variables = dashboard.get("templating", {}).get("list", [])
    assert any(v.get("type") == "datasource" for v in variables), "dashboards must not hard-code a datasource"


def _walk_schema(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for key, child in schema.get("properties", {}).items():
        found += _walk_schema(child, f"{path}.{key}" if path else key)
    return found


def test_every_value_has_a_schema_with_a_description_and_objects_are_closed() -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from chart_readme import parse_docs

    documented_whole = parse_docs((CHART / "values.yaml").read_text())

    def check(values: dict[str, Any], schema: dict[str, Any], prefix: str) -> None:
        properties = schema["properties"]
        assert schema.get("additionalProperties") is False, f"{prefix or '<root>'}: additionalProperties"
        assert set(values) == set(properties), f"{prefix}: values {set(values) ^ set(properties)} vs schema"
        for key, value in values.items():
            child = properties[key]
            assert child.get("description"), f"{prefix}{key} has no description in values.schema.json"
            # A map documented as a whole (labels, resources, a selector) has its own schema shape.
            if isinstance(value, dict) and f"{prefix}{key}" not in documented_whole:
                check(value, child, f"{prefix}{key}.")

    check(VALUES, SCHEMA, "")
    assert all(s.get("description") for p, s in _walk_schema(SCHEMA) if p)


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("operator.logFormat=xml", "logFormat"),
        ("operator.replicas=2", "additional properties 'replicas' not allowed"),
        ("operator.image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.prometheusRule.operatorDown.severity=page", "severity"),
        ("operator.prometheusRule.reconcileErrors.threshold=2", "threshold"),
        ("kubePrometheusStack.retention=30days", "retention"),
        ("operator.watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
        ("dcgmExporter.port=70000", "port"),
        ("dcgmExporter.image.digest=latest", "digest"),
        ("tests.busyboxImage.digest=sha256:abc", "digest"),
        ("dcgmExporter.scratchSizeLimit=lots", "scratchSizeLimit"),
    ],
)
def test_schema_refuses_invalid_values_naming_the_value(setting: str, complaint: str) -> None:
    from tests.chart.chartlib import KUBE_VERSION

    result = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting, check=False)
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr


def test_chart_metadata_follows_the_review_guidelines() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"] == ">=1.29.0-0"
    assert chart["appVersion"] and chart["version"]
    assert chart["type"] == "application"


def test_rendering_refuses_a_kubernetes_older_than_kube_version() -> None:
    result = helm("template", "x", str(CHART), "--kube-version", "1.28.9", check=False)
    assert result.returncode != 0 and "kubeVersion" in result.stderr


def test_default_render_is_reproducible() -> None:
    assert render() == render()
