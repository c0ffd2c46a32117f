"""Prometheus alerting and recording rules for one SLMDeployment (owned by the monitoring-as-code work)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def render_rule_groups(*, name: str, namespace: str, alerts: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The `groups` of the PrometheusRule for SLMDeployment `namespace/name`.

    `alerts` is `spec.monitoring.alerts` as written (may be partial or None); defaults come from
    slm_operator.monitoring.defaults. Series of this deployment carry job=<name>, namespace=<namespace>.
    """
    raise NotImplementedError
