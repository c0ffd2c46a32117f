"""Monitoring content rendered per SLMDeployment: Prometheus rules, Grafana dashboards, Alertmanager routing.

Pure functions: spec in, plain dicts out. The operator wraps them into PrometheusRule, ConfigMap and
AlertmanagerConfig objects; tests feed them straight to promtool, Prometheus and Alertmanager.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml


@functools.cache
def load_data(name: str) -> dict[str, Any]:
    """One of the YAML files of `data/` (rules, the metric catalogue), parsed once. Do not mutate it."""
    data: dict[str, Any] = yaml.safe_load(resources.files(__name__).joinpath("data", name).read_text())
    return data
