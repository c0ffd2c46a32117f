"""Kept for the tests' imports: the operator process helper lives in slm_devtools (the demo uses it too)."""

from slm_devtools.operator_process import CRD, REPO, OperatorProcess, install_crd, parse_metrics

__all__ = ["CRD", "REPO", "OperatorProcess", "install_crd", "parse_metrics"]
