"""Grafana dashboards (JSON model) for one SLMDeployment and for the fleet (owned by the monitoring work)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def render_dashboard(*, name: str, namespace: str, model: str, alerts: Mapping[str, Any] | None) -> dict[str, Any]:
    """The per-deployment dashboard; alert thresholds from `alerts` drawn on the matching panels."""
    raise NotImplementedError


def render_fleet_dashboard() -> dict[str, Any]:
    """The fleet overview dashboard shipped by the Helm chart."""
    raise NotImplementedError
