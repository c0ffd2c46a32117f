"""A third-party runtime's serving process watched by the real Prometheus with the chart's rules.

    python -m slm_devtools.runtimeplane      # llama.cpp: serve the tiny model, scrape it, print the URLs

What runs: the runtime's own binary (llama.cpp's `llama-server`, built by `make deps`) with exactly the
arguments slm_operator.runtimes renders for the container (only the executable's path differs from the
image's), and the pinned Prometheus, which scrapes it at the metrics endpoint the rendering names with the
target labels the Prometheus Operator gives a pod scraped through the operator's ServiceMonitor
(namespace, service, job = the SLMDeployment's name, pod, container = the container's name, instance),
and evaluates the chart's shared recording rules (charts/slm-monitoring/rules/recording-rules.yaml, as
Helm ships them) with the deployment's alert rules rendered for that runtime. A bounded load generator
keeps requests flowing. Nothing is mocked; there is no cluster (the Prometheus Operator's discovery is
proved by tests/monitoring/test_dataplane.py for the built-in server).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slm_devtools.dataplane import LOOPBACK, http_json, http_ok, wait_until
from slm_devtools.promstack import PrometheusAPI
from slm_devtools.tools import REPO_ROOT, tool
from slm_operator.monitoring.rules import render_rule_groups
from slm_operator.runtimes import render_runtime

CHART_RULES = REPO_ROOT / "charts" / "slm-monitoring" / "rules" / "recording-rules.yaml"
# The executable of each runtime's container, as `make deps` builds it here.
BINARIES = {"llamacpp": "llama-server"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RuntimeServer:
    """The runtime's binary started with the rendered container's arguments (`container["args"]`)."""

    container: Mapping[str, Any]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.container['port']}"

    def start(self, timeout: float = 180) -> RuntimeServer:
        binary = tool(BINARIES[self.container["runtime"]])
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([binary, *self.container["args"]], stdout=out, stderr=subprocess.STDOUT)
        health = self.container["probes"]["readiness"]["httpGet"]["path"]

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{binary} exited ({self.process.returncode}): {self.log_tail()}")
            return http_ok(f"{self.url}{health}")

        wait_until(ready, timeout=timeout, interval=0.2, what=f"{binary} ready at {self.url}{health}")
        return self

    def log_tail(self, size: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@dataclass
class LocalPrometheus:
    """The pinned Prometheus with a static scrape of one target and the given rule files."""

    workdir: Path
    target: str  # host:port
    metrics_path: str
    target_labels: Mapping[str, str]
    rule_files: list[Path]
    interval: str = "1s"
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> PrometheusAPI:
        return PrometheusAPI(f"http://{LOOPBACK}:{self.port}")

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [{
                "job_name": f"serviceMonitor/{self.target_labels['namespace']}/{self.target_labels['job']}/0",
                "metrics_path": self.metrics_path,
                "static_configs": [{"targets": [self.target], "labels": dict(self.target_labels)}],
                # The Prometheus Operator's ServiceMonitor scrape keeps the target's `job` as given.
                "honor_labels": False,
            }],
        }  # fmt: skip

    def start(self, timeout: float = 120) -> LocalPrometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yaml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = self.port or free_port()
        log = self.workdir / "prometheus.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address={LOOPBACK}:{self.port}", "--web.enable-lifecycle"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {log.read_text()[-3000:]}")
            return http_ok(f"{self.api.url}/-/ready")

        wait_until(ready, timeout=timeout, interval=0.2, what="prometheus ready")
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@dataclass
class Load:
    """Completions at about `rate` per second from one thread, until stopped (bounded: one in flight)."""

    url: str
    body: Mapping[str, Any]
    rate: float = 2.0
    sent: int = 0
    failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        def run() -> None:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    http_json(f"{self.url}/v1/completions", method="POST", body=dict(self.body), timeout=60)
                    self.sent += 1
                except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                    self.failed += 1
                self._stop.wait(max(0.0, 1 / self.rate - (time.monotonic() - began)))

        self._thread = threading.Thread(target=run, name="runtime-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=70)


@dataclass
class RuntimePlane:
    """One SLMDeployment's serving container of `runtime`, scraped and evaluated as in a cluster."""

    runtime: str
    model: str  # what the rendering takes: a hub id, or a path (llama.cpp: a .gguf file)
    workdir: Path
    name: str = "phi"
    namespace: str = "llm"
    served_model_name: str = "tiny"
    alerts: Mapping[str, Any] | None = None
    max_context: int = 256
    extra_args: tuple[str, ...] = ("--threads", "1")
    load_rate: float = 2.0
    interval: str = "1s"
    container: dict[str, Any] = field(default_factory=dict)
    server: RuntimeServer | None = None
    prometheus: LocalPrometheus | None = None
    load: Load | None = None
    pod: str = ""

    def rule_files(self) -> list[Path]:
        """The chart's shared rules as Helm ships them, then the deployment's groups for this runtime."""
        groups = render_rule_groups(name=self.name, namespace=self.namespace, alerts=self.alerts, runtime=self.runtime)
        own = self.workdir / "deployment-rules.yaml"
        own.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        return [CHART_RULES, own]

    def start(self) -> RuntimePlane:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        # The operator's rendering, unchanged: the container listens on every address of its pod.
        self.container = render_runtime(self.runtime, model=self.model, served_model_name=self.served_model_name,
                                        port=port, max_context=self.max_context, gpus=0,
                                        extra_args=list(self.extra_args))  # fmt: skip
        self.pod = f"{self.name}-6d9f8b7c5-x2k4q"
        try:
            self.server = RuntimeServer(self.container, self.workdir / f"{self.runtime}.log").start()
            metrics = self.container["metrics"]
            labels = {"namespace": self.namespace, "service": self.name, "job": self.name, "pod": self.pod,
                      "container": self.container["container"]}  # fmt: skip
            self.prometheus = LocalPrometheus(
                self.workdir / "prometheus",
                f"{LOOPBACK}:{metrics['port']}",
                metrics["path"],
                labels,
                self.rule_files(),
                interval=self.interval,
            ).start()
            body = {"model": self.served_model_name, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
            self.load = Load(self.server.url, body, rate=self.load_rate).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for thing in (self.load, self.prometheus, self.server):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.stop()

    def selector(self) -> str:
        return f'namespace="{self.namespace}",job="{self.name}"'


def main() -> None:
    from slm_devtools.gguf import ensure_tiny_gguf

    workdir = Path.cwd() / ".runtimeplane"
    plane = RuntimePlane("llamacpp", str(ensure_tiny_gguf(log=print)), workdir).start()
    assert plane.server is not None and plane.prometheus is not None
    print(f"llama-server {plane.server.url}   prometheus {plane.prometheus.api.url}   (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        plane.stop()


if __name__ == "__main__":
    main()
