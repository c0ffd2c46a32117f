"""Names, labels and spec accessors shared by the renderers and the handlers (pure, no API calls)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from slm_operator import GROUP, KIND, VERSION

API_VERSION = f"{GROUP}/{VERSION}"
PART_OF = "slm-monitoring"
APP_NAME = "slm-server"
MANAGED_BY = "slm-operator"
# Carried by every child so a child event finds its SLMDeployment without reading ownerReferences.
PARENT_LABEL = "slm.dev/deployment"
SERVER_PORT = 8000


def get(obj: Mapping[str, Any] | None, path: str, default: Any = None) -> Any:
    """`obj["a"]["b"]` for path "a.b", or `default` when any step is missing or None."""
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, Mapping) or current.get(part) is None:
            return default
        current = current[part]
    return current


@dataclasses.dataclass(frozen=True)
class Parent:
    """The identity of one SLMDeployment (what every child points back to)."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        # controller=true: `kubectl get` shows the owner and the garbage collector deletes in the
        # background; blockOwnerDeletion stays false so the operator needs no finalizers RBAC on the CR.
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": False,
        }

    def selector_labels(self) -> dict[str, str]:
        """The pod selector: stable for the life of the deployment, never a version."""
        return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": self.name}

    def labels(self, component: str) -> dict[str, str]:
        return {
            **self.selector_labels(),
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": MANAGED_BY,
            PARENT_LABEL: self.name,
        }

    @property
    def endpoint(self) -> str:
        return f"http://{self.name}.{self.namespace}.svc:{SERVER_PORT}"


def child_names(name: str) -> dict[str, str]:
    """Deterministic child names per kind (a retry or a restarted operator finds the same object)."""
    return {
        "Deployment": name,
        "Service": name,
        "PodDisruptionBudget": name,
        "ServiceMonitor": name,
        "PrometheusRule": name,
        "ConfigMap": f"{name}-dashboard",
        "AlertmanagerConfig": name,
    }
