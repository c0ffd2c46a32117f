"""AlertmanagerConfig content from `spec.monitoring.notifications` (owned by the monitoring work)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def render_alertmanager_config_spec(
    *, name: str, namespace: str, notifications: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The `spec` of a monitoring.coreos.com/v1alpha1 AlertmanagerConfig, or None when nothing is configured.

    Secrets are referenced (SecretKeySelector), never copied.
    """
    raise NotImplementedError
