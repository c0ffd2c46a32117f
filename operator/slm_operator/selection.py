"""Which labels make a ServiceMonitor / PrometheusRule visible to the cluster's Prometheus resources.

kube-prometheus-stack's Prometheus selects monitors by its Helm release label (`release: <name>`)
unless told otherwise; an SLMDeployment whose spec leaves the labels empty gets them from here.
Semantics follow the Prometheus Operator: a missing (nil) selector selects nothing, `{}` selects all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if (op == "In" and (not present or labels[key] not in values)) or (
            op == "NotIn" and present and labels[key] in values
        ) or (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def labels_for(selector: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The fewest labels that satisfy `selector`, or None when no label set can (nil, or Exists without a value)."""
    if selector is None:
        return None
    labels = {str(k): str(v) for k, v in (selector.get("matchLabels") or {}).items()}
    for expr in selector.get("matchExpressions") or []:
        if expr.get("operator") == "In" and expr.get("values"):
            labels.setdefault(expr["key"], str(expr["values"][0]))
    return labels if selector_matches(selector, labels) else None


def resolve(
    wanted: Mapping[str, str], selectors: Sequence[Mapping[str, Any] | None], prometheuses: Sequence[str], what: str
) -> tuple[dict[str, str], str | None]:
    """(labels to put on the object, problem message or None).

    `wanted` are the spec's labels: used as given, and checked against the selectors. Empty: the labels
    that satisfy the first Prometheus (by namespace/name) whose selector can be satisfied.
    """
    if not prometheuses:
        return dict(wanted), None  # nothing to check against (Prometheus not installed yet)
    if wanted:
        if any(selector_matches(s, wanted) for s in selectors):
            return dict(wanted), None
        return dict(wanted), (
            f"no Prometheus selects the {what} labels {dict(wanted)} (Prometheus resources: {', '.join(prometheuses)})"
        )
    for selector in selectors:
        labels = labels_for(selector)
        if labels is not None:
            return labels, None
    names = ", ".join(prometheuses)
    return {}, f"no Prometheus {what} selector can be satisfied by labels (Prometheus resources: {names})"
