"""Kept for the tests' imports: the operator process helper lives in slm_operator.devenv (the demo uses it too)."""

from __future__ import annotations

from typing import Any

from slm_operator.devenv.cluster import ClusterBase, wait_for
from slm_operator.devenv.operator_process import CRD, REPO, OperatorProcess, parse_metrics


def install_crd(cluster: ClusterBase) -> None:
    """Apply the SLMDeployment CRD and wait until it is Established and served.

    Polls the condition instead of `kubectl wait`, which fails outright ("status.conditions accessor
    error") when it reads the CRD before the API server has written any condition.
    """
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))

    def established() -> bool:
        crd: dict[str, Any] = cluster.kubectl_json("get", "crd", "slmdeployments.slm.dev")
        conditions = crd.get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions) and (
            cluster.kubectl("get", "slmd", "-A", check=False).returncode == 0)

    wait_for("the SLMDeployment CRD to be served", established, timeout=60)


__all__ = ["CRD", "REPO", "OperatorProcess", "install_crd", "parse_metrics"]
