"""Every alert family's promtool cases on each third-party runtime's native series (runtime_promtool_cases.py):
the chart's shared recording rules (all runtimes' groups, as a cluster loads them) with one deployment's
PrometheusRule rendered for that runtime."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from slm_devtools.tools import tool
from slm_operator.monitoring.rules import render_rule_groups

from .promtool_cases import NAME, NAMESPACE
from .runtime_promtool_cases import FAMILIES, build_runtime_test_files
from .test_rules_promtool import with_shared, write_rule_files


@pytest.fixture(scope="module")
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runtime = request.param
    directory = tmp_path_factory.mktemp(f"rules-{runtime}")
    groups = with_shared(render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=None, runtime=runtime))
    paths = write_rule_files(directory, groups)
    tests = {}
    for family, document in build_runtime_test_files(runtime, groups=groups, rule_files=paths).items():
        path = directory / f"test-{family}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
        tests[family] = path
    return {"runtime": runtime, "paths": paths, "tests": tests}


CASES = [(runtime, family) for runtime, families in FAMILIES.items() for family in families]


@pytest.mark.parametrize(("rendered", "family"), CASES, indirect=["rendered"], ids=[f"{r}-{f}" for r, f in CASES])
def test_promtool_rule_tests_pass_on_native_series(rendered: dict[str, Any], family: str) -> None:
    path: Path = rendered["tests"][family]
    result = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


@pytest.mark.parametrize("rendered", list(FAMILIES), indirect=True)
def test_promtool_check_rules_is_clean_for_each_runtime(rendered: dict[str, Any]) -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", "--lint=all", "--lint-fatal",
                             *rendered["paths"].values()], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cases_fail_on_a_wrong_native_name(tmp_path: Path) -> None:
    """Not vacuous: the vLLM error cases against rules reading a misspelt counter fail."""
    groups = with_shared(render_rule_groups(name=NAME, namespace=NAMESPACE, alerts=None, runtime="vllm"))
    for group in groups:
        for rule in group["rules"]:
            rule["expr"] = rule["expr"].replace("vllm:request_success_total", "vllm:request_succes_total")
    paths = write_rule_files(tmp_path, groups)
    document = build_runtime_test_files("vllm", groups=groups, rule_files=paths)["errors"]
    path = tmp_path / "test-errors.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
    result = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "[vllm] SLMHighErrorRate fires 5m after crossing its threshold" in result.stdout + result.stderr
