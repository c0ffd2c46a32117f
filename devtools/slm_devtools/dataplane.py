"""The data plane: the real servers of an SLMDeployment's pods, scraped and alerted on by the monitoring
kube-prometheus-stack users have, and the sinks that receive the notifications.

Used by tests/monitoring (marker `dataplane`), bench/ and `make demo`. Every start waits for readiness
with a deadline, every stop is clean (SIGTERM, then SIGKILL after a grace period), and the binaries are
the pinned ones from slm_devtools.tools.

- `MonitoringPlane`: an SLMDeployment applied to the cluster and reconciled by the real operator; the
  SLM server of each of its (KWOK-faked) pods runs here at the pod's address (slm_devtools.localpods);
  the Prometheus Operator (slm_devtools.promstack) turns the ServiceMonitor, PrometheusRule and
  AlertmanagerConfig the operator wrote into Prometheus' and Alertmanager's configuration; Prometheus
  discovers the pods through the API server and scrapes them.
- `SlmServer`: one running server pod: its URL, /metrics, and its fault admin API (`FaultAdmin`).
- `SmtpSink`: an aiosmtpd SMTP server collecting messages (what Alertmanager's email receiver sends).
- `WebhookSink`: an HTTP server collecting JSON POSTs; serves as Slack incoming webhook (`/slack`)
  and Alertmanager webhook (`/hook`) at once.
- `LoadGenerator`: bounded background traffic (a fixed request rate, a cap on requests in flight).
- `chart_recording_rules` / `install_chart_recording_rules`: the chart's shared recording rules (the
  PrometheusRule `helm template` renders from templates/rules), which every SLMDeployment's alerts read.
- `ManagedProcess`: a child process with its log in a file (the log plane's collector and store).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import yaml

from slm_devtools import tools
from slm_devtools.cluster import ClusterBase, free_port
from slm_devtools.localpods import LocalKubelet, LocalPod
from slm_devtools.operator_process import OperatorProcess, install_crd
from slm_devtools.promstack import AlertmanagerAPI, PrometheusAPI, PrometheusStack, ensure_namespace

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
# Kept as names the tests and benchmarks read: the Prometheus and Alertmanager the stack runs.
Prometheus = PrometheusAPI
Alertmanager = AlertmanagerAPI


class NotReady(TimeoutError):
    """A process or condition did not come up before its deadline."""


def wait_until(
    condition: Callable[[], T | None], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll `condition` until it returns something truthy; its value, or NotReady after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # a server still starting refuses connections
            last_error = error
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise NotReady(f"{what} not met within {timeout:.0f}s{detail}")
        time.sleep(interval)


def http_json(url: str, *, method: str = "GET", body: Any = None, timeout: float = 10,
              headers: Mapping[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - local http URLs only
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - local URLs only
        text = response.read().decode()
    return json.loads(text) if text else None


def http_ok(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - local URLs only
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class ManagedProcess:
    """A child process with its output in a log file, stopped for sure on `stop()`."""

    name: str
    args: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})},
                cwd=self.cwd, start_new_session=True,  # its own process group: stop() reaches its children too
            )  # fmt: skip
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_running(self) -> None:
        if not self.running():
            raise RuntimeError(f"{self.name} exited early; its log ({self.log_path}):\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = 10) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=grace)

    def kill(self) -> None:
        """SIGKILL (a crash, for tests of what follows one)."""
        if self.running():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        def ready() -> bool:
            self.check_running()
            return check()

        try:
            wait_until(ready, timeout=timeout, interval=0.2, what=f"{self.name} ready")
        except NotReady as error:
            raise NotReady(f"{error}; log tail:\n{self.log_tail()}") from None


# ---- the chart --------------------------------------------------------------------------------------

CHART = tools.REPO_ROOT / "charts" / "slm-monitoring"
CHART_RELEASE = "slm-monitoring"
CHART_NAMESPACE = "slm-system"
RECORDING_RULES_TEMPLATE = "templates/rules/prometheusrule.yaml"


def helm_template(*, release: str = CHART_RELEASE, namespace: str = CHART_NAMESPACE, set_values: Sequence[str] = (),
                  values: Mapping[str, Any] | None = None, show_only: Sequence[str] = (),
                  api_versions: Sequence[str] = ()) -> list[dict[str, Any]]:
    """`helm template` of the chart by the pinned Helm, for the pinned Kubernetes version, as objects."""
    kube_version = tools.versions()["KUBERNETES_VERSION"].lstrip("v")
    args = [tools.tool("helm"), "template", release, str(CHART), "--namespace", namespace,
            "--kube-version", kube_version]  # fmt: skip
    for api in api_versions:
        args += ["--api-versions", api]
    for template in show_only:
        args += ["--show-only", template]
    for item in set_values:
        args += ["--set", item]
    with contextlib.ExitStack() as stack:
        if values:
            import tempfile

            handle = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".yaml"))
            yaml.safe_dump(dict(values), handle)
            handle.flush()
            args += ["--values", handle.name]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"helm template failed ({result.returncode}): {result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def chart_recording_rules(stack_release: str, *, release: str = CHART_RELEASE,
                          namespace: str = CHART_NAMESPACE) -> dict[str, Any]:
    """The PrometheusRule of the chart's shared recording rules exactly as `helm install <release>
    --namespace <namespace> --set kubePrometheusStack.release=<stack_release>` creates it on a cluster
    serving the PrometheusRule API (templates/rules/prometheusrule.yaml; no second copy of the rules)."""
    docs = helm_template(release=release, namespace=namespace, show_only=[RECORDING_RULES_TEMPLATE],
                         set_values=[f"kubePrometheusStack.release={stack_release}"],
                         api_versions=["monitoring.coreos.com/v1/PrometheusRule"])
    if len(docs) != 1 or docs[0].get("kind") != "PrometheusRule":
        kinds = [d.get("kind") for d in docs]
        raise RuntimeError(f"{RECORDING_RULES_TEMPLATE} rendered {kinds}, not one PrometheusRule")
    return docs[0]


def install_chart_recording_rules(cluster: ClusterBase, stack: PrometheusStack, *,
                                  timeout: float = 60) -> tuple[str, str]:
    """Apply the chart's shared recording rules (`chart_recording_rules`, labelled for the stack's
    `release`) and wait until Prometheus evaluates them; their (namespace, name). NotConsumed if not."""
    rule = chart_recording_rules(stack.settings.release)
    namespace, name = rule["metadata"]["namespace"], rule["metadata"]["name"]
    ensure_namespace(cluster, namespace)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=helm", "-f", "-",
                    input=json.dumps(rule))
    stack.wait_rules_loaded(namespace, name, timeout=timeout)
    return namespace, name


# ---- the SLM server ---------------------------------------------------------------------------------

# What turns the fault admin API on in the server. `spec.server.faultsAdmin: true` in the resource makes
# the operator set the first; the two others are what a server in development reads instead.
FAULT_ADMIN_ENV = {"SLM_FAULTS_ADMIN": "true", "SLM_FAULT_INJECTION": "true", "SLM_FAULT_ADMIN_API": "true"}


@dataclass(frozen=True)
class FaultAdmin:
    """Where a server takes faults at run time: the one place that knows the admin API's address.

    The admin routes are never on the serving port: the server listens for them on SLM_ADMIN_HOST
    (default: loopback, which is the pod's own address here) and SLM_ADMIN_PORT (default 8001), and
    wants `Authorization: Bearer $SLM_ADMIN_TOKEN` when the token is set. A host that means "the pod
    itself" is the pod's address here.
    """

    url: str
    token: str | None = None

    @classmethod
    def of(cls, *, address: str, port: int, env: Mapping[str, str]) -> FaultAdmin:
        """`port` (the serving one) is not where the admin routes are; kept for the callers' symmetry."""
        host = env.get("SLM_ADMIN_HOST") or address
        if host in ("0.0.0.0", "127.0.0.1", "localhost", "::"):  # noqa: S104 - the pod's own addresses
            host = address
        admin_port = env.get("SLM_ADMIN_PORT") or "8001"  # slm_server's default admin_port
        return cls(f"http://{host}:{admin_port}/admin/faults", env.get("SLM_ADMIN_TOKEN") or None)

    def send(self, body: Mapping[str, Any], method: str = "POST") -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        http_json(self.url, method=method, body=dict(body), headers=headers)


@dataclass
class SlmServer:
    """The real inference server of one pod, running here at the pod's address."""

    pod: LocalPod

    @property
    def address(self) -> str:
        return f"{self.pod.address}:{self.pod.port('http', 'server')}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def env(self) -> dict[str, str]:
        server = next(c for c in self.pod.containers if c.name == "server")
        return dict(server.env)

    @property
    def faults(self) -> FaultAdmin:
        return FaultAdmin.of(address=self.pod.address, port=self.pod.port("http", "server"), env=self.env)

    def stop(self) -> None:
        self.pod.stop()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:  # noqa: S310
            return str(response.read().decode())

    def set_faults(
        self, *, error_rate: float = 0.0, added_latency_seconds: float = 0.0, degraded_output: bool = False
    ) -> str:
        """Set the server's faults at run time; returns the form the server accepted.

        The contract is `POST /admin/faults` with {"errorRate", "addedLatencySeconds",
        "degradedOutput"}; a server that only takes `PUT` with snake_case fields (error_rate,
        latency_seconds, degraded_rate) is driven that way so the alert tests still run, and the
        returned form lets a contract test flag the difference.
        """
        admin = self.faults
        try:
            admin.send({"errorRate": error_rate, "addedLatencySeconds": added_latency_seconds,
                        "degradedOutput": degraded_output})
            return "contract"
        except urllib.error.HTTPError as error:
            if error.code not in (404, 405, 422):
                raise
        admin.send({"error_rate": error_rate, "latency_seconds": added_latency_seconds,
                    "degraded_rate": 1.0 if degraded_output else 0.0}, method="PUT")
        return "PUT snake_case"


# ---- load -----------------------------------------------------------------------------------------


@dataclass
class LoadGenerator:
    """Background requests at `rate` per second, at most `concurrency` in flight, `limit` in total."""

    url: str
    rate: float = 4.0
    concurrency: int = 4
    limit: int = 10_000
    path: str = "/v1/completions"
    body: Mapping[str, Any] = field(
        default_factory=lambda: {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8}
    )
    statuses: dict[int, int] = field(default_factory=dict)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _slots: threading.Semaphore | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LoadGenerator:
        self._slots = threading.Semaphore(self.concurrency)
        self._thread = threading.Thread(target=self._run, name="load-generator", daemon=True)
        self._thread.start()
        return self

    def _one(self) -> None:
        assert self._slots is not None
        try:
            data = json.dumps(self.body).encode()
            request = urllib.request.Request(  # noqa: S310 - loopback http URL
                self.url + self.path, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
                    response.read()
                    code = response.status
            except urllib.error.HTTPError as error:
                code = error.code
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                code = 0
            with self._lock:
                self.statuses[code] = self.statuses.get(code, 0) + 1
        finally:
            self._slots.release()

    def _run(self) -> None:
        assert self._slots is not None
        period = 1 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set() and self.sent < self.limit:
            if not self._slots.acquire(timeout=0.5):
                continue  # the server is slower than `rate`: skip rather than pile up
            threading.Thread(target=self._one, daemon=True).start()
            self.sent += 1
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self._slots:  # let requests in flight finish
            for _ in range(self.concurrency):
                self._slots.acquire(timeout=60)


# ---- notification sinks ---------------------------------------------------------------------------


@dataclass
class Received:
    at: float  # time.time() when it arrived
    path: str
    body: Any


class _Collector:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def add(self, item: Any) -> None:
        with self.changed:
            self.items.append(item)
            self.changed.notify_all()

    def snapshot(self) -> list[Any]:
        with self.lock:
            return list(self.items)

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NotReady(f"{what} not received within {timeout:.0f}s; got {len(self.items)} other(s)")
                self.changed.wait(remaining)


class WebhookSink:
    """Collects JSON POSTs on any path: a Slack-compatible incoming webhook and a generic webhook."""

    def __init__(self) -> None:
        self.received = _Collector()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                sink.received.add(Received(time.time(), self.path, body))
                reply = b"ok"  # what Slack answers
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-sink", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def start(self) -> WebhookSink:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float, what: str = "webhook") -> Received:
        item: Received = self.received.wait_for(predicate, timeout, what)
        return item


@dataclass
class Mail:
    at: float
    sender: str
    recipients: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["Subject"] or "")

    def text(self) -> str:
        parts = []
        for part in self.message.walk():
            if part.get_content_maintype() == "text":
                parts.append(str(part.get_content()))
        return "\n".join(parts)


class SmtpSink:
    """A loopback SMTP server (aiosmtpd) that keeps every message it is sent."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.received = _Collector()
        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                assert isinstance(message, EmailMessage)
                sink.received.add(Mail(time.time(), envelope.mail_from, list(envelope.rcpt_tos), message))
                return "250 Message accepted for delivery"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname=LOOPBACK, port=self.port)

    @property
    def smarthost(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def wait_for(self, predicate: Callable[[Mail], bool], timeout: float, what: str = "mail") -> Mail:
        item: Mail = self.received.wait_for(predicate, timeout, what)
        return item


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    """Stop every started thing (in reverse order) however the block ends."""
    try:
        yield
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.stop()


# ---- the whole plane ------------------------------------------------------------------------------

MODEL_CLAIM = "models"


def create_model_volume(cluster: ClusterBase, namespace: str, *, claim: str = MODEL_CLAIM) -> str:
    """A statically bound PersistentVolume and its claim `claim` in `namespace`, as a cluster would have for
    model weights (the pods' volume here is a local directory: LocalKubelet's `claims`). Returns the PV name."""
    volume_name = f"slm-models-{namespace}"
    volume = {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume_name},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadOnlyMany"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "hostPath": {"path": "/data/models"}, "claimRef": {"namespace": namespace, "name": claim}},
    }
    claim_object = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": volume_name,
                 "resources": {"requests": {"storage": "10Gi"}}},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(volume))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(claim_object))
    return volume_name


def model_claim_dir(workdir: Path, model_dir: Path, sub_path: str) -> Path:
    """What the `models` claim holds here: a directory whose `sub_path` is the model."""
    root = workdir / "pv-models"
    root.mkdir(parents=True, exist_ok=True)
    link = root / sub_path
    if not link.exists():
        link.symlink_to(model_dir)
    return root


def server_pod_selector(cluster: ClusterBase, namespace: str, name: str, *, timeout: float = 60) -> str:
    """The label selector of the serving pods: the one in the Deployment the operator made for `name`."""
    def selector() -> str | None:
        found = cluster.kubectl("get", "deployment", name, "-n", namespace, "-o",
                                "jsonpath={.spec.selector.matchLabels}", check=False)
        labels = json.loads(found.stdout) if found.returncode == 0 and found.stdout.strip() else None
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) if labels else None

    return wait_until(selector, timeout=timeout, interval=0.5, what=f"Deployment {namespace}/{name}")


@dataclass
class MonitoringPlane:
    """One SLMDeployment end to end: the operator writes, the Prometheus Operator consumes, the servers answer.

    The chart's shared recording rules first (`install_chart_recording_rules`: what the chart installs
    once per cluster, and what every alert of the operator's per-deployment PrometheusRule reads). Then,
    in a fresh namespace: the SLMDeployment (`resource()`), reconciled by the real operator (a process
    watching that namespace); the server of its pod running here at the pod's address; Slack and webhook
    receivers pointing at `hooks` (/slack, /hook), e-mail at `smtp`; bounded load. Started, it has waited
    for the ServiceMonitor's target to be up, the PrometheusRule to be loaded and the AlertmanagerConfig
    to be in Alertmanager's configuration — a failure says which object did not get through and why.
    Timing knobs (windows, intervals) are for tests and demos; production keeps the CRD's defaults.
    """

    cluster: ClusterBase
    stack: PrometheusStack
    workdir: Path
    name: str = "phi"
    model_name: str = "tiny"
    alerts: Mapping[str, Any] | None = None
    scrape_interval: str = "1s"
    group_wait: str = "1s"
    group_interval: str = "1s"
    load_rate: float = 3.0
    server_env: Mapping[str, str] = field(default_factory=dict)
    namespace: str = ""
    smtp: SmtpSink | None = None
    hooks: WebhookSink | None = None
    operator: OperatorProcess | None = None
    kubelet: LocalKubelet | None = None
    server: SlmServer | None = None
    load: LoadGenerator | None = None
    timings: dict[str, float] = field(default_factory=dict)
    recording_rules: tuple[str, str] = ("", "")  # (namespace, name) of the chart's shared PrometheusRule
    _volume: str = ""
    _started: list[Any] = field(default_factory=list)

    def notifications(self, smtp: SmtpSink) -> dict[str, Any]:
        return {
            "groupWait": self.group_wait, "groupInterval": self.group_interval, "repeatInterval": "1h",
            "slack": {"channel": "#slm-alerts", "apiURLSecretRef": {"name": "slack", "key": "url"},
                      "severities": ["critical", "warning"]},
            "email": {"to": ["sre@example.com"], "from": "slm@example.com", "smarthost": smtp.smarthost,
                      "requireTLS": False, "severities": ["critical"]},
            "webhook": {"urlSecretRef": {"name": "hook", "key": "url"}},
        }  # fmt: skip

    def resource(self, smtp: SmtpSink) -> dict[str, Any]:
        """The SLMDeployment under test (the tiny model from the `models` claim, no GPU)."""
        monitoring: dict[str, Any] = {"scrapeInterval": self.scrape_interval, "notifications": self.notifications(smtp)}
        if self.alerts is not None:
            monitoring["alerts"] = dict(self.alerts)
        return {
            "apiVersion": "slm.dev/v1alpha1", "kind": "SLMDeployment", "metadata": {"name": self.name},
            "spec": {
                "model": {"name": self.model_name, "source": {"pvc": {"claimName": MODEL_CLAIM, "subPath": "tiny"}}},
                "replicas": 1,
                "resources": {"gpus": 0, "requests": {"cpu": "500m", "memory": "1Gi"}},
                "server": {"maxNewTokens": 16, "faultsAdmin": True},
                "monitoring": monitoring,
            },
        }

    @property
    def prometheus(self) -> PrometheusAPI:
        return self.stack.prometheus

    @property
    def alertmanager(self) -> AlertmanagerAPI:
        return self.stack.alertmanager

    def rule_groups(self) -> list[dict[str, Any]]:
        """The rule groups Prometheus loaded from the PrometheusRule the operator wrote."""
        return self.stack.loaded_rule_groups(self.namespace, self.name)

    def shared_rule_groups(self) -> list[dict[str, Any]]:
        """The rule groups Prometheus loaded from the chart's shared recording rules."""
        return self.stack.loaded_rule_groups(*self.recording_rules)

    def start(self, model_dir: str | Path) -> MonitoringPlane:
        began = time.monotonic()
        try:
            self.smtp = self._start(SmtpSink())
            self.hooks = self._start(WebhookSink())
            self.recording_rules = install_chart_recording_rules(self.cluster, self.stack)
            self.timings["chart recording rules loaded"] = time.monotonic() - began
            install_crd(self.cluster)
            self.namespace = self.namespace or self.cluster.new_namespace(f"dp-{self.name}")
            self._volume = create_model_volume(self.cluster, self.namespace)
            for secret, url in (("slack", self.hooks.url("/slack")), ("hook", self.hooks.url("/hook"))):
                self.cluster.kubectl("create", "secret", "generic", secret, "-n", self.namespace,
                                     f"--from-literal=url={url}")
            self.operator = OperatorProcess(self.cluster.kubeconfig, self.workdir / "operator", resync_seconds=3,
                                            namespaces=[self.namespace])
            self._started.append(self.operator)
            self.operator.start()
            self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-",
                                 input=json.dumps(self.resource(self.smtp)))
            self.kubelet = LocalKubelet(self.cluster, self.workdir / "pods",
                                        claims={MODEL_CLAIM: model_claim_dir(self.workdir, Path(model_dir), "tiny")})
            self._started.append(self.kubelet)
            selector = server_pod_selector(self.cluster, self.namespace, self.name)
            pod = self.kubelet.running_pod(self.namespace, selector, timeout=120)
            self.server = SlmServer(self.kubelet.run(pod, env={**FAULT_ADMIN_ENV, **self.server_env}, timeout=240))
            self.timings["server ready"] = time.monotonic() - began
            self.load = self._start(LoadGenerator(self.server.url, rate=self.load_rate, concurrency=2, body={
                "model": self.model_name, "prompt": "The quick brown fox", "max_tokens": 8}))
            # Up to the config reloader's 3-minute check when this is not the first scrape change since
            # Prometheus started (see PrometheusStack.explain_service_monitor).
            self.stack.wait_target_up(self.namespace, self.name, timeout=240)
            self.timings["target up"] = time.monotonic() - began
            self.stack.wait_rules_loaded(self.namespace, self.name, timeout=60)
            self.stack.wait_alertmanager_config(self.namespace, self.name, timeout=60)
            self.timings["monitoring consumed"] = time.monotonic() - began
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, thing: T) -> T:
        thing.start()  # type: ignore[attr-defined]
        self._started.append(thing)
        return thing

    def stop(self) -> None:
        for thing in reversed(self._started):
            with contextlib.suppress(Exception):
                thing.stop()
        self._started.clear()
        if self.namespace:
            self.cluster.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)
        if self._volume:
            self.cluster.kubectl("delete", "persistentvolume", self._volume, "--wait=false", check=False)
