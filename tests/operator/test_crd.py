"""The CRD is the API users write against: its defaults, validations and metadata are checked here
(the API server's own verdict on invalid objects is in tests/e2e/test_operator.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes_validate  # noqa: F401 - imported to prove the dev extra is present
import pytest
import yaml

from slm_operator import GROUP, KIND, PLURAL, VERSION
from slm_operator.monitoring import rules
from slm_operator.monitoring.defaults import ALERT_DEFAULTS, SEVERITIES
from tests.operator.conftest import CRD_PATH, EXAMPLES, defaulted, load_example

CONTRACT_ALERT_NAMES = {
    "SLMHighErrorRate", "SLMSlowResponseTime", "SLMHighGPUUtilization", "SLMLowDiskSpace", "SLMHighGPUMemory",
    "SLMGPUXidErrors", "SLMGPUMetricsAbsent", "SLMTargetDown", "SLMPodCrashLooping", "SLMPodNotReady",
    "SLMHighTimeToFirstToken", "SLMQueueSaturated", "SLMErrorBudgetBurnFast", "SLMErrorBudgetBurnSlow",
    "SLMPerplexityDrift", "SLMOutputLengthDrift", "SLMScrapeTargetMissing", "SLMFaultInjectionEnabled",
}


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{key}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_alert_defaults_equal_the_operator_defaults(schema: dict[str, Any]) -> None:
    alerts = schema["properties"]["spec"]["properties"]["monitoring"]["properties"]["alerts"]
    assert defaulted(alerts, {}) == ALERT_DEFAULTS


def test_an_empty_monitoring_section_is_fully_defaulted(schema: dict[str, Any]) -> None:
    spec = defaulted(schema["properties"]["spec"], {"model": {"name": "m"}})
    assert spec["monitoring"]["alerts"]["errorRate"] == ALERT_DEFAULTS["errorRate"]
    assert spec["monitoring"]["scrapeInterval"] == "15s"
    assert spec["replicas"] == 1 and spec["resources"]["gpus"] == 1
    assert spec["monitoring"]["dashboards"]["labels"] == {"grafana_dashboard": "1"}


def test_every_field_is_described_and_spec_is_structural(schema: dict[str, Any]) -> None:
    undocumented = [
        path for path, sub in walk(schema["properties"]["spec"], "spec")
        if "description" not in sub and not path.endswith("{}")
    ]
    undocumented += [p for p, s in walk(schema["properties"]["status"], "status") if "description" not in s]
    assert undocumented == []
    preserving = [p for p, s in walk(schema) if s.get("x-kubernetes-preserve-unknown-fields")]
    assert preserving == []
    untyped = [p for p, s in walk(schema) if "type" not in s and not s.get("x-kubernetes-int-or-string")]
    assert untyped == []


# Alerts on signals only some runtimes have (rendered for vLLM and SGLang); alerts.disabled names them too.
RUNTIME_ALERT_NAMES = {"SLMKVCacheSaturated", "SLMRequestsPreempted"}


def test_disabled_lists_exactly_the_contract_alert_names(schema: dict[str, Any]) -> None:
    disabled = schema["properties"]["spec"]["properties"]["monitoring"]["properties"]["alerts"]["properties"][
        "disabled"]
    assert set(disabled["items"]["enum"]) == CONTRACT_ALERT_NAMES | RUNTIME_ALERT_NAMES
    assert set(rules.ALERT_NAMES) == CONTRACT_ALERT_NAMES
    assert set(rules.runtime_alert_names()) == RUNTIME_ALERT_NAMES


def test_runtime_alert_settings_default_to_the_rules_defaults(schema: dict[str, Any]) -> None:
    """One source: data/rules.yaml's runtime_alerts `defaults`, which the CRD's schema defaults equal."""
    alerts = defaulted(schema["properties"]["spec"]["properties"]["monitoring"]["properties"]["alerts"], {})
    by_config = {spec["config"]: spec["defaults"] for spec in rules.rules_data()["runtime_alerts"]}
    assert alerts["kvCacheSaturation"] == by_config["kvCacheSaturation"] == {
        "thresholdPercent": 90, "for": "10m", "severity": "warning"}
    assert alerts["requestPreemptions"] == by_config["requestPreemptions"] == {
        "thresholdPerSecond": 0.1, "for": "10m", "severity": "warning"}


def test_runtime_lists_the_builtin_server_and_every_rendered_runtime(schema: dict[str, Any]) -> None:
    from slm_operator.runtimes import RUNTIMES

    runtime = schema["properties"]["spec"]["properties"]["runtime"]
    assert runtime["enum"] == ["builtin", "vllm", "sglang", "tgi", "llamacpp"] == ["builtin", *RUNTIMES]
    assert runtime["default"] == "builtin"


def test_severities_are_the_closed_set(schema: dict[str, Any]) -> None:
    enums = [s["enum"] for p, s in walk(schema) if p.endswith("everity") or p.endswith("severities[]")]
    assert enums and all(tuple(e) == SEVERITIES for e in enums)


def test_durations_and_thresholds_carry_cel_rules_whose_message_names_the_field(schema: dict[str, Any]) -> None:
    alerts = schema["properties"]["spec"]["properties"]["monitoring"]["properties"]["alerts"]["properties"]
    for name, block in alerts.items():
        for field, sub in (block.get("properties") or {}).items():
            if field in ("for", "window", "baselineWindow") or field.startswith("threshold") or field in (
                    "zScore", "minFreePercent", "availabilityPercent"):
                rules_ = sub.get("x-kubernetes-validations")
                assert rules_, f"{name}.{field} has no validation"
                message = rules_[0]["message"]
                assert field in message or "`for`" in message or "`window`" in message or \
                    "`baselineWindow`" in message, message


def test_names_subresources_and_printer_columns(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert (spec["group"], spec["names"]["kind"], spec["names"]["plural"]) == (GROUP, KIND, PLURAL)
    assert spec["names"]["shortNames"] == ["slmd"]
    assert "slm" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["name"] == VERSION
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Model", "Replicas", "Ready", "Phase", "Age"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_only_use_fields_the_schema_knows(example: Any, schema: dict[str, Any]) -> None:
    """An unknown field would be silently pruned by the API server; catch typos in the examples here."""

    def check(value: Any, sub: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in sub:
            for key, item in value.items():
                assert key in sub["properties"], f"{path}.{key} is not in the schema"
                check(item, sub["properties"][key], f"{path}.{key}")
        elif isinstance(value, list) and "items" in sub:
            for item in value:
                check(item, sub["items"], f"{path}[]")
        if "enum" in sub:
            assert value in sub["enum"], f"{path}={value!r}"

    obj = load_example(example)
    assert obj["apiVersion"] == f"{GROUP}/{VERSION}" and obj["kind"] == KIND
    check(obj["spec"], schema["properties"]["spec"], "spec")
