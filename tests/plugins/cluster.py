"""pytest plugin: `cluster`, a real Kubernetes control plane for the e2e tests.

By default the control plane is started from the pinned binaries (`make deps`) on loopback, once per
test session. To run the same tests on a cluster you made (e.g. `make kind-up`), name its kubeconfig
explicitly — the ambient KUBECONFIG is never used, so tests cannot write into someone's real cluster:

    pytest tests/e2e --existing-kubeconfig ~/.kube/kind-slm      # or SLM_E2E_KUBECONFIG=...
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slm_devtools.cluster import ClusterBase, ExistingCluster, LocalCluster

_boot: dict[str, float] = {}


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


@pytest.fixture
def namespace(cluster: ClusterBase) -> Iterator[str]:
    """A fresh namespace enforcing the restricted Pod Security Standard, deleted afterwards."""
    name = cluster.new_namespace("t")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for what, seconds in _boot.items():
        terminalreporter.write_line(f"slm-monitoring: {what}: {seconds:.1f}s")
