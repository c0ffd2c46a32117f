"""Fixtures of the log-plane tests: the chart's collector and VictoriaLogs as processes
(slm_devtools.logplane), the real control plane (the `cluster` fixture) for the collector's
k8sattributes, and pods registered there whose container logs are CRI files on a fake node's disk.

Every wait has a deadline; nothing sleeps to hope.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from slm_devtools.cluster import ClusterBase
from slm_devtools.logplane import LogPlane, PodLogs, log_plane, pod_name, register_pod, serving_pod
from slm_devtools.tinymodel import ensure_tiny_model
from slm_operator import render
from slm_operator.spec import Parent, parse_spec

SERVER_IMAGE = "ghcr.io/slm-monitoring/slm-server:0.1.0"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def node(cluster: ClusterBase) -> str:
    """The node the collector runs for: KWOK's CPU node on the local control plane (it keeps the pods
    bound to it Running), else the first node of the cluster."""
    names = [n["metadata"]["name"] for n in cluster.kubectl_json("get", "nodes")["items"]]
    return "cpu-node-0" if "cpu-node-0" in names else names[0]


@pytest.fixture
def plane(cluster: ClusterBase, node: str, tmp_path: Path) -> Iterator[LogPlane]:
    """The chart's log plane with its defaults (`logs.enabled=true`)."""
    with log_plane(cluster, tmp_path / "node", node) as started:
        yield started


@dataclass
class Pod:
    """A pod of an SLMDeployment as the operator renders it, registered in the API server."""

    namespace: str
    deployment: str
    name: str
    uid: str
    manifest: dict[str, Any]

    @property
    def server_container(self) -> dict[str, Any]:
        container: dict[str, Any] = self.manifest["spec"]["containers"][0]
        assert container["name"] == "server"
        return container

    def logs(self, plane: LogPlane, container: str = "server") -> PodLogs:
        return plane.pod_logs(self.namespace, self.name, self.uid, container)


def make_pod(cluster: ClusterBase, namespace: str, node: str, deployment: str, spec: dict[str, Any]) -> Pod:
    parent = Parent(deployment, namespace, str(uuid.uuid4()))
    context = render.RenderContext(server_image=SERVER_IMAGE, allow_fault_injection=True)
    rendered = render.render_deployment(parent, parse_spec(spec), context)
    manifest = serving_pod(rendered, name=pod_name(deployment), node=node)
    uid = register_pod(cluster, namespace, manifest)
    return Pod(namespace, deployment, manifest["metadata"]["name"], uid, manifest)


@pytest.fixture
def new_pod(cluster: ClusterBase, namespace: str, node: str) -> Any:
    """make(deployment, spec): a pod of that SLMDeployment in the test's (restricted) namespace."""

    def make(deployment: str, spec: dict[str, Any] | None = None) -> Pod:
        spec = spec or {"model": {"name": "tiny"}, "resources": {"gpus": 0}}
        return make_pod(cluster, namespace, node, deployment, spec)

    return make


# ---- replaying request lines ---------------------------------------------------------------------------


REQUEST_LINE = {
    # A request line as the server writes it (docs/reference/server.md): one real line's fields and shape.
    "timestamp": "2026-12-03T12:00:00.000Z", "level": "info", "logger": "slm_server.access", "message": "request",
    "event": "request", "request_id": "", "http.request.method": "POST", "http.route": "/v1/completions",
    "http.response.status_code": 200, "latency_s": 0.0421, "gen_ai.operation.name": "text_completion",
    "gen_ai.request.model": "tiny", "gen_ai.response.model": "tiny", "gen_ai.request.max_tokens": 8,
    "gen_ai.request.temperature": 0.0, "gen_ai.request.top_p": 1.0, "gen_ai.usage.input_tokens": 5,
    "gen_ai.usage.output_tokens": 8, "gen_ai.usage.cache_read.input_tokens": 0,
    "gen_ai.response.finish_reasons": ["length"], "gen_ai.server.time_to_first_token": 0.0121,
    "gen_ai.server.time_per_output_token": 0.0043, "slm.perplexity": 17.2, "slm.queue_time_s": 0.0001,
    "slm.stream": False, "gen_ai.output.length": 31,
    "gen_ai.output.sha256": "9f2b6c4ed3a1b0e8c7d6f5a4b3c2d1e0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4",
}  # fmt: skip


def request_line(request_id: str, at: float | None = None) -> bytes:
    """A request line with its own id and the time it is written."""
    at = time.time() if at is None else at
    doc = {**REQUEST_LINE, "request_id": request_id,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"}
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class Replayer:
    """Writes `total` request lines with ids `<prefix>-000000`… into a container's log at `rate` lines a
    second (in bursts every 20 ms, as a busy server flushes), from a thread.

    A stand-in for the server process where the tests need thousands of lines at a steady rate that
    the tiny model on two shared cores cannot serve; the lines have the real line's shape
    (`REQUEST_LINE`), and the completeness test ships the real server's own lines."""

    logs: PodLogs
    total: int
    rate: float
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    written: int = 0
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def ids(self) -> list[str]:
        return [f"{self.prefix}-{i:06d}" for i in range(self.total)]

    def start(self) -> Replayer:
        self._thread = threading.Thread(target=self._run, name="replayer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            started = time.monotonic()
            while self.written < self.total:
                due = min(self.total, int((time.monotonic() - started) * self.rate) + 1)
                if due > self.written:
                    self.logs.write_many(request_line(f"{self.prefix}-{i:06d}") for i in range(self.written, due))
                    self.written = due
                time.sleep(0.02)
        except BaseException as error:  # surfaced by wait_written / join
            self._error = error

    def wait_written(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.written < count:
            if self._error:
                raise self._error
            assert time.monotonic() < deadline, f"only {self.written} of {count} lines written in {timeout}s"
            time.sleep(0.02)

    def join(self, timeout: float) -> None:
        self.wait_written(self.total, timeout)
        assert self._thread is not None
        self._thread.join(timeout=5)


def counts_by_request_id(entries: Sequence[dict[str, str]], prefix: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}$")
    for entry in entries:
        request_id = entry.get("request_id", "")
        if pattern.match(request_id):
            counts[request_id] = counts.get(request_id, 0) + 1
    return counts
