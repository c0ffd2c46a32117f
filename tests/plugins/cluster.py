"""pytest plugin: `cluster`, a real Kubernetes control plane for the e2e tests, `prometheus_stack`, the
monitoring kube-prometheus-stack users have on it, and missing tools reported as failures.

By default the control plane is started from the pinned binaries (`make deps`) on loopback, once per
test session. To run the same tests on a cluster you made (e.g. `make kind-up`), name its kubeconfig
explicitly — the ambient KUBECONFIG is never used, so tests cannot write into someone's real cluster:

    pytest tests/e2e --existing-kubeconfig ~/.kube/kind-slm      # or SLM_E2E_KUBECONFIG=...

A test that needs a binary `make deps` builds and does not find it fails (with the message naming
`make deps`); it never skips, whether it raised slm_devtools.tools.ToolMissing or skipped with its message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slm_devtools.cluster import ClusterBase, ExistingCluster, LocalCluster
from slm_devtools.promstack import PrometheusStack
from slm_devtools.tools import ToolMissing

_boot: dict[str, float] = {}
# What slm_devtools.tools.ToolMissing says (`… not found in …: run `make deps` …`, `… missing: run `make deps``).
MISSING_TOOL_MARK = "run `make deps`"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("slm-monitoring cluster")
    group.addoption(
        "--existing-kubeconfig", default=os.environ.get("SLM_E2E_KUBECONFIG"),
        help="run e2e tests against this existing cluster (e.g. kind) instead of a local control plane",
    )
    group.addoption(
        "--keep-cluster", action="store_true",
        help="leave the local control plane's data directory (logs, kubeconfig) after the run",
    )


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterBase]:
    """A running cluster with fake GPU nodes (KWOK) and an admin kubeconfig at `.kubeconfig`."""
    existing = request.config.getoption("--existing-kubeconfig")
    started = time.monotonic()
    if existing:
        with ExistingCluster.attach(Path(existing).expanduser()) as attached:
            _boot["existing cluster attach"] = time.monotonic() - started
            yield attached
        return
    workdir = tmp_path_factory.mktemp("cluster", numbered=True)
    with LocalCluster.start(workdir, keep=request.config.getoption("--keep-cluster")) as local:
        _boot["local control plane start"] = local.boot_seconds
        yield local


@pytest.fixture(scope="session")
def prometheus_stack(cluster: ClusterBase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusStack]:
    """The Prometheus Operator with kube-prometheus-stack's Prometheus and Alertmanager (release label
    selectors included) on `cluster`, their pods run here (slm_devtools.promstack). Shared by the session,
    as one kube-prometheus-stack serves a whole cluster."""
    stack = PrometheusStack(cluster, tmp_path_factory.mktemp("prometheus-stack"))
    started = time.monotonic()
    with stack.running():
        _boot["prometheus stack start"] = time.monotonic() - started
        yield stack


@pytest.fixture
def namespace(cluster: ClusterBase) -> Iterator[str]:
    """A fresh namespace enforcing the restricted Pod Security Standard, deleted afterwards."""
    name = cluster.new_namespace("t")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """A skip because a pinned tool is missing is a failure (the project's rule; CI=true and `make test` alike)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or call.excinfo is None:
        return
    reason = str(call.excinfo.value)
    if MISSING_TOOL_MARK in reason or isinstance(call.excinfo.value, ToolMissing):
        report.outcome = "failed"
        report.longrepr = f"a tool this test needs is missing (a failure, never a skip): {reason}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for what, seconds in _boot.items():
        terminalreporter.write_line(f"slm-monitoring: {what}: {seconds:.1f}s")
