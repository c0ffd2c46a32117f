"""Shared helpers of the operator unit tests (no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "manifests" / "crds" / "slm.dev_slmdeployments.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def load_example(path: Path) -> dict[str, Any]:
    obj = yaml.safe_load(path.read_text())
    assert isinstance(obj, dict)
    return obj


def crd_schema() -> dict[str, Any]:
    """The SLMDeployment's openAPIV3Schema, as the API server gets it."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def defaulted(schema: dict[str, Any], value: Any) -> Any:
    """What the API server's structural defaulting makes of `value` (defaults apply top-down)."""
    if value is None:
        if "default" not in schema:
            return None
        value = schema["default"]
    if schema.get("type") == "object" and isinstance(value, dict):
        value = dict(value)
        for key, sub in (schema.get("properties") or {}).items():
            filled = defaulted(sub, value.get(key))
            if filled is not None:
                value[key] = filled
    if schema.get("type") == "array" and isinstance(value, list) and "items" in schema:
        value = [defaulted(schema["items"], item) for item in value]
    return value
