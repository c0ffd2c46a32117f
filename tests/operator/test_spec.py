"""The typed spec is the operator's one place for the spec's defaults: they must be the CRD's, field
for field, or an SLMDeployment created through the API and one rendered in a test would differ."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from slm_operator.spec import parse_spec
from tests.operator.conftest import EXAMPLES, crd_schema, defaulted, load_example


def skeleton(schema: dict[str, Any]) -> Any:
    """The smallest value that still has every optional object of `schema` in it (each with only its
    required fields), so that defaulting reaches every field the schema has."""
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        required = set(schema.get("required") or [])
        value = {}
        for key, sub in schema["properties"].items():
            nested = sub.get("type") == "object" and "properties" in sub
            objects_list = sub.get("type") == "array" and sub.get("items", {}).get("type") == "object"
            if key in required or nested or objects_list:
                value[key] = skeleton(sub)
        return value
    if kind == "array":
        return [skeleton(schema["items"])]
    if kind == "string":
        return schema.get("enum", ["x"])[0]
    raise AssertionError(f"no sample for a required {kind} field")


SPEC_SCHEMA = crd_schema()["properties"]["spec"]


def test_every_default_of_the_model_is_the_crds() -> None:
    """Both directions: a field the CRD defaults and the model does not (or defaults differently), a
    field the model defaults and the CRD does not, and a field only one of them knows all fail here."""
    full = skeleton(SPEC_SCHEMA)
    assert "notifications" in full["monitoring"] and "source" in full["model"]  # the skeleton reaches deep
    assert parse_spec(full).wire() == defaulted(SPEC_SCHEMA, full)


def test_a_minimal_spec_is_defaulted_like_the_api_server_does() -> None:
    minimal = {"model": {"name": "org/m"}}
    assert parse_spec(minimal).wire() == defaulted(SPEC_SCHEMA, minimal)


def test_defaults_a_user_relies_on() -> None:
    spec = parse_spec({"model": {"name": "org/m"}})
    assert (spec.replicas, spec.resources.gpus, spec.logging.outputs, spec.server.faults_admin) == (1, 1, "hash", False)
    assert spec.monitoring.alerts.error_rate.threshold == 0.05 and spec.monitoring.alerts.error_rate.for_ == "5m"
    assert spec.network_policy.enabled is True and spec.network_policy.allowed_namespaces == []
    assert (spec.resources.tmp_size_limit, spec.resources.model_cache_size_limit) == ("1Gi", "20Gi")


def test_a_partial_alert_keeps_the_other_defaults_of_that_alert() -> None:
    spec = parse_spec({"model": {"name": "m"}, "monitoring": {"alerts": {"gpuXidErrors": {"for": "3m"}}}})
    assert (spec.monitoring.alerts.gpu_xid_errors.for_, spec.monitoring.alerts.gpu_xid_errors.severity) == (
        "3m", "critical")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_parse_and_round_trip(example: Any) -> None:
    spec = load_example(example)["spec"]
    assert parse_spec(parse_spec(spec).wire()) == parse_spec(spec)


def test_a_field_the_operator_does_not_know_is_an_error_naming_it() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_spec({"model": {"name": "m"}, "server": {"maxNewTokenz": 5}})
    assert caught.value.errors()[0]["loc"] == ("server", "maxNewTokenz")
