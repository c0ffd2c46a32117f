"""checkov on the rendered chart: no finding except the documented ones in checkov_skips.yaml."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chartlib import CI_VALUES, REPO_ROOT, render

SKIPS: list[dict[str, Any]] = yaml.safe_load((Path(__file__).parent / "checkov_skips.yaml").read_text())


@pytest.fixture(scope="module")
def checkov() -> str:
    """checkov in its own cached venv (scripts/deps/checkov.sh; its dependencies clash with ours)."""
    result = subprocess.run([str(REPO_ROOT / "scripts" / "deps" / "checkov.sh")], capture_output=True, text=True,
                            timeout=900, check=False)
    if result.returncode != 0:
        pytest.fail(f"scripts/deps/checkov.sh failed: {result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def run_checkov(checkov: str, directory: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(failed checks, the resource ids in the report) of one checkov run over `directory`."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run(
        # --skip-download: offline (no Prisma Cloud guideline lookups).
        [checkov, "--directory", str(directory), "--framework", "kubernetes", "--skip-download",
         "--output", "json", "--quiet", "--compact"],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )
    assert result.stdout.strip(), f"checkov printed nothing ({result.returncode}): {result.stderr[-2000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert all(r.get("check_type") == "kubernetes" for r in reports)
    assert sum(r["summary"]["resource_count"] for r in reports) > 0, "checkov saw no resources"
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports)
    # `--quiet` leaves the passed checks out of the report: a resource with none failed is not listed.
    checked = {c["resource"] for r in reports for kind in ("passed_checks", "failed_checks")
               for c in r["results"].get(kind, [])}
    return [failed for r in reports for failed in r["results"]["failed_checks"]], sorted(checked)


def accepted(finding: dict[str, Any]) -> dict[str, Any] | None:
    for skip in SKIPS:
        if finding["check_id"] == skip["check"] and any(
            fnmatch.fnmatchcase(finding["resource"], pattern) for pattern in skip["resources"]
        ):
            return skip
    return None


BROKEN_RELEASE = "broken"


@pytest.fixture(scope="module")
def checkov_run(checkov: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], list[str]]:
    """One checkov run (it takes ~15 s) over the default rendering, the default with log shipping on (the
    collector and the bundled VictoriaLogs as a user turning it on gets them), every ci/ values file and a
    deliberately broken copy of the operator Deployment, each under its own release name."""
    directory = tmp_path_factory.mktemp("rendered")
    (directory / "default.yaml").write_text(render(release="default"))
    (directory / "logs-default.yaml").write_text(render(release="logs-default", set_values=["logs.enabled=true"]))
    for values in CI_VALUES:
        name = values.name.removesuffix("-values.yaml")
        (directory / f"{name}.yaml").write_text(render(release=name, values=[values]))
    broken = [d for d in yaml.safe_load_all(render(release=BROKEN_RELEASE)) if d and d["kind"] == "Deployment"]
    broken[0]["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    (directory / "broken.yaml").write_text(yaml.safe_dump_all(broken))
    return run_checkov(checkov, directory)


@pytest.fixture(scope="module")
def all_findings(checkov_run: tuple[list[dict[str, Any]], list[str]]) -> list[dict[str, Any]]:
    return checkov_run[0]


@pytest.fixture(scope="module")
def checked(checkov_run: tuple[list[dict[str, Any]], list[str]]) -> list[str]:
    return checkov_run[1]


def _is_broken(finding: dict[str, Any]) -> bool:
    return f".{BROKEN_RELEASE}-" in finding["resource"]


@pytest.fixture(scope="module")
def findings(all_findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The findings on what the chart really renders."""
    return [f for f in all_findings if not _is_broken(f)]


def test_checkov_finds_nothing_but_the_documented_exceptions(findings: list[dict[str, Any]]) -> None:
    unexpected = [f"{f['check_id']} {f['resource']}: {f['check_name']}" for f in findings if accepted(f) is None]
    assert not unexpected, "\n".join(unexpected)


def test_every_documented_exception_is_still_needed(findings: list[dict[str, Any]]) -> None:
    used = {id(accepted(f)) for f in findings}
    stale = [skip["check"] for skip in SKIPS if id(skip) not in used]
    assert not stale, f"checkov_skips.yaml entries that match no finding any more: {stale}"


def test_every_exception_says_why() -> None:
    for skip in SKIPS:
        assert skip["check"].startswith(("CKV_K8S_", "CKV2_K8S_")) and len(skip["reason"]) > 40, skip


def test_checkov_sees_the_log_collector_and_the_bundled_store(checked: list[str]) -> None:
    """The log plane's workloads of the default logs rendering are in checkov's report (each has a finding
    accepted in checkov_skips.yaml, so its absence would mean checkov never saw it)."""
    for kind_and_name in ("DaemonSet.slm-system.logs-default-slm-monitoring-log-collector",
                          "StatefulSet.slm-system.logs-default-slm-monitoring-victorialogs"):
        assert any(resource.startswith(kind_and_name) for resource in checked), kind_and_name


def test_checkov_reports_a_privileged_container(all_findings: list[dict[str, Any]]) -> None:
    """The scan can fail: the operator Deployment made privileged is reported (and not accepted)."""
    assert any(f["check_id"] == "CKV_K8S_16" and _is_broken(f) and accepted(f) is None for f in all_findings)
