"""The operator as a real process (`python -m slm_operator`) against a cluster's kubeconfig.

Used by the e2e tests, bench/bench_operator.py and `make demo`: start, wait healthy, read its own
/metrics, SIGKILL and restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .cluster import ClusterBase, free_port, wait_for
from .tools import REPO_ROOT as REPO

CRD = REPO / "manifests" / "crds" / "slm.dev_slmdeployments.yaml"


def parse_metrics(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus text exposition (enough for counters and gauges)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return values


class OperatorProcess:
    def __init__(self, kubeconfig: Path, logdir: Path, *, resync_seconds: float = 3.0,
                 extra_env: dict[str, str] | None = None, namespaces: list[str] | None = None,
                 verbose: bool = False) -> None:
        self.kubeconfig = kubeconfig
        self.namespaces = list(namespaces or [])  # empty: every namespace
        self.logdir = logdir
        self.resync_seconds = resync_seconds
        self.extra_env = extra_env or {}
        self.verbose = verbose  # kopf's debug lines too (watch restarts, retries)
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.health_port = 0
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.logdir / f"operator-{self.starts}.log"

    def start(self, *, wait: bool = True) -> None:
        self.starts += 1
        self.metrics_port, self.health_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "SLM_OPERATOR_BIND_HOST": "127.0.0.1",
            "SLM_OPERATOR_RESYNC_SECONDS": str(self.resync_seconds),
            "SLM_OPERATOR_DISCOVERY_TTL_SECONDS": "1",
            "SLM_OPERATOR_SERVER_IMAGE": "registry.example/slm-server:test",
            **self.extra_env,
        }
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slm_operator", "--metrics-port", str(self.metrics_port),
             "--health-port", str(self.health_port), "--log-format", "json",
             *(f"--namespace={namespace}" for namespace in self.namespaces), *(["--verbose"] if self.verbose else [])],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
        log.close()
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 60) -> None:
        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                ok = r.status == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                return ok and r.status == 200

        wait_for("the operator to be healthy", healthy, timeout=timeout, on_timeout=self.tail)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return parse_metrics(r.read().decode())

    def sum_of(self, name: str, **labels: str) -> float:
        total = 0.0
        for key, value in self.metrics().items():
            metric, _, rest = key.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def writes(self) -> float:
        return self.sum_of("slm_operator_api_writes_total")

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP for the block, SIGCONT after: the process misses what happens meanwhile, its
        connections stay open on its side (a GC pause, a throttled container)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, no graceful shutdown — a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def install_crd(cluster: ClusterBase) -> None:
    """Apply the SLMDeployment CRD and wait until it is established and served."""
    cluster.apply_crds([CRD])
    # Established can precede discovery by a moment; a successful `kubectl get` proves it is served.
    wait_for("slmdeployments to be served",
             lambda: cluster.kubectl("get", "slmd", "-A", check=False).returncode == 0, timeout=30)
