"""The log plane as local processes: the chart's OpenTelemetry Collector and VictoriaLogs, fed by pod
log files written as the kubelet's container runtime writes them.

Used by tests/logs, bench/bench_logs.py and (through `deployment_log_query`) the demo.

What runs is what the chart deploys, read from `helm template` output (`render_chart`), never a second
copy of it:
- the collector: the ConfigMap's `config.yaml`, the DaemonSet container's arguments (feature gates
  included) and environment; the binary is the one `make deps` builds from the same collector release
  with only the components that configuration uses (scripts/deps/otelcol-builder.yaml);
- VictoriaLogs: the StatefulSet container's arguments (`-retentionPeriod` from `logs.retention` …).

`localize_collector_config` and `VictoriaLogs` change only what cannot be the same outside a pod, each
said where it is done: the pod's volume mounts become directories under a temporary host root
(`<root>/var/log/pods`, the state directory), the listening addresses become free loopback ports, and
the collector reaches the API server through a kubeconfig of the chart's own ServiceAccount (the
ClusterRole the chart renders is applied to the cluster, so its permissions are tested as they are).

Pods: `PodLogs` is the runtime's side of a container's log, `<root>/var/log/pods/<namespace>_<pod>_<uid>/
<container>/0.log`, in the CRI format (`<RFC 3339 nano time> stdout F <line>`, lines over 16 KiB split
into `P` parts as containerd does). `ServerPod` runs the real server (`python -m slm_server`) with the
environment of the pod the operator renders for an SLMDeployment, its stdout and stderr copied line by
line into such a file, and registers that pod (labels from the operator's renderer) in the API server so
the collector's k8sattributes finds it, as it finds a real pod.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from slm_devtools import tools
from slm_devtools.cluster import ClusterBase, free_port
from slm_devtools.dataplane import LOOPBACK, FaultAdmin, ManagedProcess, NotReady, helm_template, http_ok, wait_until
from slm_devtools.localpods import cri_lines, pod_log_path

CHART = tools.REPO_ROOT / "charts" / "slm-monitoring"


# ---- the chart's rendering -------------------------------------------------------------------------


def render_chart(
    *,
    release: str = "slm",
    namespace: str = "slm-system",
    values: Mapping[str, Any] | None = None,
    set_values: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """`helm template` of the chart with `logs.enabled=true` (and `values`), as a list of objects."""
    return helm_template(release=release, namespace=namespace, values=values,
                         set_values=["logs.enabled=true", *set_values])


def _one(docs: Iterable[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]  # fmt: skip
    if len(found) != 1:
        raise LookupError(f"expected one {kind} of component {component} in the chart output, found {len(found)}")
    return found[0]


def collector_objects(docs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The collector's objects in the chart output, by kind."""
    kinds = ("ConfigMap", "DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding")
    return {kind: _one(docs, kind, "log-collector") for kind in kinds}


def store_objects(docs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The bundled VictoriaLogs' objects in the chart output, by kind."""
    return {kind: _one(docs, kind, "log-store") for kind in ("StatefulSet", "Service")}


def collector_config(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The collector configuration the chart renders (its ConfigMap's config.yaml)."""
    config: dict[str, Any] = yaml.safe_load(collector_objects(docs)["ConfigMap"]["data"]["config.yaml"])
    return config


def _container(workload: Mapping[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    container: dict[str, Any] = containers[0]
    return container


def host_paths(workload: Mapping[str, Any], host_root: Path) -> dict[str, Path]:
    """{mount path in the container: directory under `host_root`} for every hostPath or volume-claim
    mount of the workload's container: where a node (or a volume) would hold it."""
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
    mapped: dict[str, Path] = {}
    for mount in _container(workload).get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "hostPath" in volume:
            mapped[mount["mountPath"]] = host_root / volume["hostPath"]["path"].lstrip("/")
        elif mount["name"] in claims:
            mapped[mount["mountPath"]] = host_root / "volumes" / mount["name"]
    return mapped


def _replace_prefixes(node: Any, prefixes: Mapping[str, Path]) -> Any:
    if isinstance(node, dict):
        return {key: _replace_prefixes(value, prefixes) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_prefixes(item, prefixes) for item in node]
    if isinstance(node, str):
        for prefix, local in prefixes.items():
            if node == prefix or node.startswith(prefix.rstrip("/") + "/"):
                return str(local) + node[len(prefix.rstrip("/")):]
    return node


@dataclass(frozen=True)
class CollectorPorts:
    health: int
    metrics: int


def localize_collector_config(
    config: Mapping[str, Any], daemonset: Mapping[str, Any], host_root: Path, ports: CollectorPorts,
    services: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The chart's collector configuration as it must be outside a pod; nothing else changes:

    - every path under a mount of the DaemonSet's container (the node's pod logs, the state
      directory) becomes the same path under `host_root`;
    - the health check and the collector's own metrics listen on free loopback ports (a pod has its
      own network namespace, processes on one machine do not), and a Service's address in the
      exporter's endpoint (`services`: {"<name>.<namespace>.svc:<port>": "127.0.0.1:<port>"}) is the
      loopback address its process listens on (there is no cluster DNS here);
    - k8sattributes reads the API server through `KUBECONFIG` (a kubeconfig of the chart's
      ServiceAccount) instead of the token a pod has mounted.
    """
    local = _replace_prefixes(copy.deepcopy(dict(config)), host_paths(daemonset, host_root))
    for exporter in local["exporters"].values():
        for service, address in (services or {}).items():
            exporter["endpoint"] = exporter["endpoint"].replace(f"//{service}/", f"//{address}/")
    local["extensions"]["health_check"]["endpoint"] = f"{LOOPBACK}:{ports.health}"
    for reader in local["service"]["telemetry"]["metrics"]["readers"]:
        reader["pull"]["exporter"]["prometheus"]["port"] = ports.metrics
    for name, processor in local["processors"].items():
        if name.split("/")[0] in ("k8s_attributes", "k8sattributes"):
            processor["auth_type"] = "kubeConfig"
    assert isinstance(local, dict)
    return local


# ---- pods' log files ---------------------------------------------------------------------------------


@dataclass
class PodLogs:
    """A container's log file under a kubelet-like `/var/log/pods` (the runtime's side of it)."""

    pods_dir: Path
    namespace: str
    pod: str
    uid: str
    container: str
    restart: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def path(self) -> Path:
        return pod_log_path(self.pods_dir, self.namespace, self.pod, self.uid, self.container, self.restart)

    def write(self, line: bytes | str, *, stream: str = "stdout", at: float | None = None) -> None:
        """Append one line (no newline needed) as the runtime would, flushed at once."""
        data = cri_lines(line.encode() if isinstance(line, str) else line, stream=stream, at=at)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as out:
                out.write(data)

    def write_many(self, lines: Iterable[bytes], *, stream: str = "stdout") -> None:
        """Append lines in one write (a burst the runtime flushed together)."""
        data = b"".join(cri_lines(line, stream=stream) for line in lines)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as out:
                out.write(data)


def pod_name(deployment: str) -> str:
    """A ReplicaSet pod's name: `<deployment>-<10 characters>-<5 characters>`."""
    token = uuid.uuid4().hex
    return f"{deployment}-{token[:10]}-{token[10:15]}"


def register_pod(cluster: ClusterBase, namespace: str, pod: Mapping[str, Any]) -> str:
    """Create the pod object in the API server; its uid (the one in its log directory's name)."""
    cluster.kubectl("create", "-f", "-", input=json.dumps(pod))
    name = pod["metadata"]["name"]
    uid: str = cluster.kubectl_json("get", "pod", name, "-n", namespace)["metadata"]["uid"]
    return uid


def serving_pod(deployment: Mapping[str, Any], *, name: str, node: str) -> dict[str, Any]:
    """A pod of the operator's Deployment (its template's labels and containers), bound to `node`."""
    template = copy.deepcopy(deployment["spec"]["template"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": deployment["metadata"]["namespace"],
                     "labels": template["metadata"]["labels"]},
        "spec": {**template["spec"], "nodeName": node},
    }  # fmt: skip


# ---- the real server as a pod's container -------------------------------------------------------------


@dataclass
class ServerPod:
    """The real server as the `server` container of a pod: the environment the operator renders for it
    (only the model path, the listening address and the writable directories changed to local ones),
    stdout and stderr copied line by line into the container's CRI log file, each line also kept in
    `lines` (what the container printed, for the tests to compare with the store)."""

    logs: PodLogs
    env: Mapping[str, str]
    workdir: Path
    port: int = 0
    admin_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    lines: list[bytes] = field(default_factory=list)
    _copiers: list[threading.Thread] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def faults(self) -> FaultAdmin:
        """The server's fault admin API (its own listener, never the serving port)."""
        return FaultAdmin.of(address=LOOPBACK, port=self.port, env={**self.env, "SLM_ADMIN_PORT": str(self.admin_port)})

    def start(self, timeout: float = 240) -> ServerPod:
        self.port = self.port or free_port()
        self.admin_port = self.admin_port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "SLM_HOST": LOOPBACK, "SLM_PORT": str(self.port),
               "SLM_ADMIN_PORT": str(self.admin_port)}  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "slm_server"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=self.workdir, start_new_session=True,
        )  # fmt: skip
        for stream_name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            assert stream is not None
            copier = threading.Thread(target=self._copy, args=(stream, stream_name), daemon=True,
                                      name=f"cri-{stream_name}")  # fmt: skip
            copier.start()
            self._copiers.append(copier)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}):\n{self.output_tail()}")
            return http_ok(f"{self.url}/readyz")

        try:
            wait_until(ready, timeout=timeout, interval=0.2, what="server ready")
        except (NotReady, RuntimeError):
            self.stop()
            raise
        return self

    def _copy(self, stream: IO[bytes], stream_name: str) -> None:
        for line in iter(stream.readline, b""):
            self.logs.write(line, stream=stream_name)
            self.lines.append(line.rstrip(b"\n"))

    def output_tail(self, count: int = 30) -> str:
        return b"\n".join(self.lines[-count:]).decode(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON lines the server printed, decoded."""
        out = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def stop(self, grace: float = 30) -> None:
        """SIGTERM (the kubelet's stop), SIGKILL after `grace`; then the rest of its output is copied."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=grace)
        for copier in self._copiers:
            copier.join(timeout=10)


def server_pod_env(container: Mapping[str, Any], *, model_dir: Path, served_name: str, workdir: Path,
                   **overrides: str) -> dict[str, str]:  # fmt: skip
    """The server container's environment as the operator rendered it, with the local model, the
    hub cache and the watched disk under `workdir`, and `overrides` on top."""
    env = {item["name"]: str(item["value"]) for item in container.get("env", []) if "value" in item}
    env.update({
        "SLM_MODEL": str(model_dir), "SLM_MODEL_NAME": served_name, "SLM_SERVED_MODEL_NAME": served_name,
        "HF_HOME": str(workdir / "huggingface"), "SLM_DISK_PATHS": str(workdir),
    })  # fmt: skip
    env.pop("HF_HUB_OFFLINE", None)
    env.update(overrides)
    return env


# ---- VictoriaLogs ------------------------------------------------------------------------------------


@dataclass
class VictoriaLogs:
    """VictoriaLogs single node with the arguments of the chart's StatefulSet; its data directory (the
    volume claim) and listening address are the only ones changed. Stopping and starting it again
    keeps its data and port."""

    statefulset: Mapping[str, Any]
    host_root: Path
    port: int = 0
    proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def otlp_endpoint(self) -> str:
        """The OTLP/HTTP base URL (the exporter posts to <this>/v1/logs)."""
        return f"{self.url}/insert/opentelemetry"

    def args(self) -> list[str]:
        mounts = host_paths(self.statefulset, self.host_root)
        args: list[str] = []
        for arg in _container(self.statefulset)["args"]:
            name, _, value = arg.partition("=")
            if name == "-httpListenAddr":
                arg = f"-httpListenAddr={LOOPBACK}:{self.port}"
            elif name == "-storageDataPath":
                arg = f"-storageDataPath={_replace_prefixes(value, mounts)}"
            args.append(arg)
        return args

    def start(self, timeout: float = 60) -> VictoriaLogs:
        self.port = self.port or free_port()
        for directory in host_paths(self.statefulset, self.host_root).values():
            directory.mkdir(parents=True, exist_ok=True)
        self.proc = ManagedProcess("victoria-logs", [tools.tool("victoria-logs"), *self.args()],
                                   self.host_root / "victoria-logs.log").start()  # fmt: skip
        self.proc.wait_ready(lambda: http_ok(f"{self.url}/health"), timeout)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def query(self, logsql: str, *, limit: int = 0, timeout: float = 30) -> list[dict[str, str]]:
        """The log entries a LogsQL query returns (every field as text, `_time`, `_msg`, `_stream` …)."""
        params = {"query": logsql}
        if limit:
            params["limit"] = str(limit)
        data = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(f"{self.url}/select/logsql/query", data=data, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback URL
            text = response.read().decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """A sample of VictoriaLogs' own /metrics (0 when the series is not there)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:  # noqa: S310
            text = response.read().decode()
        wanted = {f'{k}="{v}"' for k, v in (labels or {}).items()}
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            rest = series[len(name):]
            if rest and not rest.startswith("{"):
                continue
            if wanted <= set(rest.strip("{}").split(",")) if wanted else True:
                total += float(value)
        return total


# ---- the collector -------------------------------------------------------------------------------------


@dataclass
class Collector:
    """The chart's collector (its configuration, arguments and environment from the DaemonSet) as a
    process, reading `<host_root>/var/log/pods`, for node `node`."""

    docs: Sequence[dict[str, Any]]
    host_root: Path
    kubeconfig: Path
    node: str
    env: Mapping[str, str] = field(default_factory=dict)
    services: Mapping[str, str] = field(default_factory=dict)
    ports: CollectorPorts | None = None
    proc: ManagedProcess | None = None
    config_path: Path | None = None

    def args(self) -> list[str]:
        """The DaemonSet container's arguments, the configuration file being the local one."""
        assert self.config_path is not None
        container = _container(collector_objects(self.docs)["DaemonSet"])
        return [f"--config={self.config_path}" if a.startswith("--config=") else a for a in container["args"]]

    def environment(self) -> dict[str, str]:
        """The DaemonSet container's environment: the downward API's fields as a pod on `node` would get
        them, plus KUBECONFIG (see localize_collector_config)."""
        env: dict[str, str] = {"KUBECONFIG": str(self.kubeconfig)}
        container = _container(collector_objects(self.docs)["DaemonSet"])
        downward = {"status.podIP": LOOPBACK, "spec.nodeName": self.node}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "fieldRef" in item.get("valueFrom", {}):
                env[item["name"]] = downward[item["valueFrom"]["fieldRef"]["fieldPath"]]
        env.update(self.env)
        return env

    def start(self, timeout: float = 90) -> Collector:
        if self.ports is None:
            self.ports = CollectorPorts(health=free_port(), metrics=free_port())
        daemonset = collector_objects(self.docs)["DaemonSet"]
        config = localize_collector_config(collector_config(self.docs), daemonset, self.host_root, self.ports,
                                           self.services)
        for directory in host_paths(daemonset, self.host_root).values():
            directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.host_root / "otelcol-config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc = ManagedProcess("otelcol", [tools.tool("otelcol-slm"), *self.args()],
                                   self.host_root / "otelcol.log", env=self.environment()).start()  # fmt: skip
        self.proc.wait_ready(lambda: http_ok(f"http://{LOOPBACK}:{self.ports.health}/"), timeout)  # type: ignore[union-attr]
        return self

    def stop(self, grace: float = 30) -> None:
        """SIGTERM, as the kubelet stops a container (the collector drains and saves its offsets)."""
        if self.proc:
            self.proc.stop(grace=grace)

    def kill(self) -> None:
        """SIGKILL: a crash or an out-of-memory kill."""
        if self.proc:
            self.proc.kill()

    def metric(self, name: str) -> float:
        """The sum of a series of the collector's own metrics (0 when absent)."""
        assert self.ports is not None
        url = f"http://{LOOPBACK}:{self.ports.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))  # fmt: skip


def install_collector_rbac(cluster: ClusterBase, docs: Sequence[dict[str, Any]]) -> Path:
    """Apply the chart's ServiceAccount, ClusterRole and ClusterRoleBinding of the collector (its
    namespace created when missing); a kubeconfig that authenticates as that ServiceAccount."""
    objects = collector_objects(docs)
    account = objects["ServiceAccount"]["metadata"]
    namespace = account["namespace"]
    if cluster.kubectl("get", "namespace", namespace, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", namespace)
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(objects[kind]))
    return cluster.kubeconfig_for_service_account(namespace, account["name"])


# ---- the whole plane ----------------------------------------------------------------------------------


@dataclass
class LogPlane:
    """VictoriaLogs and the collector of one chart rendering, on one host root (a fake node)."""

    cluster: ClusterBase
    host_root: Path
    node: str
    set_values: Sequence[str] = ()
    release: str = "slm"
    namespace: str = "slm-system"
    store: VictoriaLogs | None = None
    collector: Collector | None = None
    docs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pods_dir(self) -> Path:
        """Where the kubelet writes pod logs on this node (the DaemonSet's `/var/log/pods`)."""
        daemonset = collector_objects(self.docs)["DaemonSet"]
        mounts = host_paths(daemonset, self.host_root)
        logs_volume = next(m for m in _container(daemonset)["volumeMounts"] if m["name"] == "pod-logs")
        return mounts[logs_volume["mountPath"]]

    def start(self) -> LogPlane:
        """The chart as `logs.enabled=true` (and `set_values`) renders it: the collector shipping to the
        bundled VictoriaLogs' Service, which is the local VictoriaLogs' loopback address here."""
        self.docs = render_chart(release=self.release, namespace=self.namespace, set_values=self.set_values)
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        store = store_objects(self.docs)
        self.store = VictoriaLogs(store["StatefulSet"], self.host_root).start()
        service = store["Service"]["metadata"]
        port = store["Service"]["spec"]["ports"][0]["port"]
        services = {f"{service['name']}.{service['namespace']}.svc:{port}": f"{LOOPBACK}:{self.store.port}"}
        kubeconfig = install_collector_rbac(self.cluster, self.docs)
        self.collector = Collector(self.docs, self.host_root, kubeconfig, self.node, services=services).start()
        return self

    def stop(self) -> None:
        if self.collector:
            self.collector.stop()
        if self.store:
            self.store.stop()

    def pod_logs(self, namespace: str, pod: str, uid: str, container: str) -> PodLogs:
        return PodLogs(self.pods_dir, namespace, pod, uid, container)


@contextlib.contextmanager
def log_plane(cluster: ClusterBase, host_root: Path, node: str, set_values: Sequence[str] = ()) -> Iterator[LogPlane]:
    plane = LogPlane(cluster, host_root, node, set_values=set_values)
    try:
        yield plane.start()
    finally:
        plane.stop()


# ---- what the demo prints ------------------------------------------------------------------------------


def logsql_quote(value: str) -> str:
    return json.dumps(value)


def deployment_query(namespace: str, deployment: str, *, since: str = "15m", where: str = "", limit: int = 20) -> str:
    """The LogsQL query of an SLMDeployment's log lines: the namespace and the deployment's name (the
    `slm.deployment` attribute the collector takes from the pod label `slm.dev/deployment`), newest first."""
    filters = [f"_time:{since}", f"k8s.namespace.name:={logsql_quote(namespace)}",
               f"slm.deployment:={logsql_quote(deployment)}"]  # fmt: skip
    if where:
        filters.append(where)
    return " ".join(filters) + f" | sort by (_time desc) | limit {limit}"


@dataclass(frozen=True)
class LogQueryResult:
    query: str
    command: str  # the same query as a user would run it against the store
    entries: list[dict[str, str]]


def deployment_log_query(store: VictoriaLogs, namespace: str, deployment: str, *, since: str = "15m",
                         where: str = "", limit: int = 20) -> LogQueryResult:  # fmt: skip
    """The log query for a deployment and what the store answers: for the demo, beside the alert
    (e.g. `where='severity_text:error'` for the failing requests of a faulted deployment)."""
    query = deployment_query(namespace, deployment, since=since, where=where, limit=limit)
    command = f"curl -s {store.url}/select/logsql/query --data-urlencode {_shell_quote('query=' + query)}"
    return LogQueryResult(query, command, store.query(query))


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def format_entries(entries: Sequence[Mapping[str, str]], fields: Sequence[str] = (
        "_time", "k8s.pod.name", "severity_text", "event", "http.route", "http.response.status_code",
        "error.type", "_msg")) -> str:  # fmt: skip
    """Entries as aligned text lines (the demo's output)."""
    return "\n".join("  ".join(f"{name}={entry[name]}" for name in fields if entry.get(name)) for entry in entries)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def wait_for_entries(store: VictoriaLogs, logsql: str, count: int, *, timeout: float,
                     check: Callable[[], None] | None = None) -> list[dict[str, str]]:  # fmt: skip
    """Poll until the query returns at least `count` entries; the entries (NotReady after `timeout`).
    `check` runs on every poll (e.g. that the collector still runs)."""
    last: list[dict[str, str]] = []

    def enough() -> list[dict[str, str]] | None:
        nonlocal last
        if check is not None:
            check()
        last = store.query(logsql)
        return last if len(last) >= count else None

    try:
        return wait_until(enough, timeout=timeout, interval=0.5, what=f"{count} entries for {logsql!r}")
    except NotReady as error:
        raise NotReady(f"{error}: {len(last)} found") from None


def utc_rfc3339(at: float) -> str:
    """The server's timestamp format (RFC 3339, UTC, milliseconds)."""
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
