"""The data plane as local processes: the SLM server, Prometheus, Alertmanager and notification sinks.

Used by tests/monitoring (marker `dataplane`) and by `make demo`. Everything listens on 127.0.0.1
on a free port, every start waits for readiness with a deadline, every stop is clean (SIGTERM, then
SIGKILL after a grace period), and the binaries are the pinned ones from slm_devtools.tools.

- `SlmServer`: `python -m slm_server` with the given env (e.g. the tiny model, faults admin on).
- `Prometheus`: the pinned prometheus with a generated config, rule files and short intervals;
  `scrape_config()` gives a server target the labels the operator's ServiceMonitor would.
- `Alertmanager`: the pinned alertmanager with a given alertmanager.yml, clustering off.
- `SmtpSink`: an aiosmtpd SMTP server collecting messages (what Alertmanager's email receiver sends).
- `WebhookSink`: an HTTP server collecting JSON POSTs; serves as Slack incoming webhook (`/slack`)
  and Alertmanager webhook (`/hook`) at once.
- `LoadGenerator`: bounded background traffic (a fixed request rate, a cap on requests in flight).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import yaml

from slm_devtools.cluster import free_port
from slm_devtools.tools import tool

T = TypeVar("T")
LOOPBACK = "127.0.0.1"


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


def http_json(url: str, *, method: str = "GET", body: Any = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - loopback http URLs only
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback URLs only
        text = response.read().decode()
    return json.loads(text) if text else None


def http_ok(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URLs only
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
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
            cwd=self.cwd,
            start_new_session=True,  # its own process group: stop() reaches its children too
        )
        log.close()
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


# ---- the SLM server -------------------------------------------------------------------------------


class _OnLoopback:
    """A server of the data plane listening on 127.0.0.1:`port`."""

    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


@dataclass
class SlmServer(_OnLoopback):
    """The real inference server as a process (`python -m slm_server`)."""

    workdir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    proc: ManagedProcess | None = None

    def start(self, timeout: float = 180) -> SlmServer:
        self.port = self.port or free_port()
        env = {"SLM_HOST": LOOPBACK, "SLM_PORT": str(self.port), "SLM_LOG_LEVEL": "warning", **self.env}
        if env.get("SLM_FAULTS_ADMIN") == "true":
            # The contract's switch, plus the two a server in development reads instead.
            env.setdefault("SLM_FAULT_INJECTION", "true")
            env.setdefault("SLM_FAULT_ADMIN_API", "true")
        if "SLM_MODEL_NAME" in env:
            env.setdefault("SLM_SERVED_MODEL_NAME", env["SLM_MODEL_NAME"])
        self.proc = ManagedProcess("slm-server", [sys.executable, "-m", "slm_server"], self.workdir / "server.log",
                                   env=env).start()  # fmt: skip
        self.proc.wait_ready(lambda: http_ok(f"{self.url}/readyz"), timeout)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

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
        contract = {
            "errorRate": error_rate,
            "addedLatencySeconds": added_latency_seconds,
            "degradedOutput": degraded_output,
        }
        try:
            http_json(f"{self.url}/admin/faults", method="POST", body=contract)
            return "contract"
        except urllib.error.HTTPError as error:
            if error.code not in (404, 405, 422):
                raise
        legacy = {
            "error_rate": error_rate,
            "latency_seconds": added_latency_seconds,
            "degraded_rate": 1.0 if degraded_output else 0.0,
        }
        http_json(f"{self.url}/admin/faults", method="PUT", body=legacy)
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


# ---- Prometheus -----------------------------------------------------------------------------------


def scrape_config(*, name: str, namespace: str, targets: list[str], pod: str, interval: str = "1s") -> dict[str, Any]:
    """A static scrape job labelled as the operator's ServiceMonitor would label the server's series.

    job=<name> (the Service's name), namespace, pod, service, container, and instance (the address).
    """
    return {
        "job_name": name,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "metrics_path": "/metrics",
        "static_configs": [
            {"targets": targets, "labels": {"namespace": namespace, "pod": pod, "service": name, "container": "server"}}
        ],
    }


@dataclass
class Prometheus(_OnLoopback):
    workdir: Path
    scrape_configs: list[dict[str, Any]] = field(default_factory=list)
    rule_groups: list[dict[str, Any]] = field(default_factory=list)
    alertmanagers: list[str] = field(default_factory=list)  # host:port
    interval: str = "1s"
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    proc: ManagedProcess | None = None

    def write_config(self) -> Path:
        rule_dir = self.workdir / "rules"
        rule_dir.mkdir(parents=True, exist_ok=True)
        for old in rule_dir.glob("*.yaml"):
            old.unlink()
        for index, group in enumerate(self.rule_groups):
            (rule_dir / f"{index:02d}.yaml").write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False))
        config: dict[str, Any] = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(rule_dir / "*.yaml")],
            "scrape_configs": self.scrape_configs,
        }
        if self.alertmanagers:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": self.alertmanagers}]}]}
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, timeout: float = 60) -> Prometheus:
        self.port = self.port or free_port()
        config = self.write_config()
        args = [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--web.enable-lifecycle",
            # Resend firing alerts every interval so Alertmanager learns of them without waiting 1m.
            f"--rules.alert.resend-delay={self.interval}",
            *self.extra_args,
        ]
        self.proc = ManagedProcess("prometheus", args, self.workdir / "prometheus.log").start()
        self.proc.wait_ready(lambda: http_ok(f"{self.url}/-/ready"), timeout)
        return self

    def reload(self) -> None:
        self.write_config()
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")  # noqa: S310 - loopback
        with urllib.request.urlopen(request, timeout=30):  # noqa: S310 - loopback
            pass

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        payload = http_json(f"{self.url}/api/v1/{path}?{query}")
        if payload.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} failed: {payload}")
        return payload["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = str(at)
        data = self.api("query", **params)
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(target["health"] == "up" for target in active)

    def rule_health(self) -> list[dict[str, Any]]:
        """Every rule with its health and last error, as Prometheus reports them."""
        rules: list[dict[str, Any]] = []
        for group in self.api("rules")["groups"]:
            rules.extend(group["rules"])
        return rules


# ---- Alertmanager ---------------------------------------------------------------------------------


@dataclass
class Alertmanager(_OnLoopback):
    workdir: Path
    config_yaml: str
    port: int = 0
    proc: ManagedProcess | None = None

    def start(self, timeout: float = 60) -> Alertmanager:
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "alertmanager.yml"
        config.write_text(self.config_yaml)
        args = [
            tool("alertmanager"),
            f"--config.file={config}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--cluster.listen-address=",  # no gossip port: a single local instance
        ]
        self.proc = ManagedProcess("alertmanager", args, self.workdir / "alertmanager.log").start()
        self.proc.wait_ready(lambda: http_ok(f"{self.url}/-/ready"), timeout)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(filters)
        result: list[dict[str, Any]] = http_json(f"{self.url}/api/v2/alerts?{query}")
        return result

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        http_json(f"{self.url}/api/v2/alerts", method="POST", body=alerts)


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


@dataclass
class MonitoringPlane:
    """Server + Prometheus (rules as the operator renders them) + Alertmanager + sinks, wired up.

    Alertmanager routing is the rendered AlertmanagerConfig converted the way the Prometheus Operator
    does; Slack and webhook receivers point at `hooks` (/slack, /hook), e-mail at `smtp`. Timing knobs
    (`interval`, `group_wait`) are for tests and demos; production keeps Alertmanager's defaults.
    """

    workdir: Path
    name: str = "phi"
    namespace: str = "llm"
    model_name: str = "tiny"
    pod: str = "phi-6d9f8b7c5-x2k4q"
    alerts: Mapping[str, Any] | None = None
    interval_s: float = 1.0
    group_wait_s: float = 1.0
    server_env: Mapping[str, str] = field(default_factory=dict)
    load_rate: float = 3.0
    smtp: SmtpSink | None = None
    hooks: WebhookSink | None = None
    server: SlmServer | None = None
    alertmanager: Alertmanager | None = None
    prometheus: Prometheus | None = None
    load: LoadGenerator | None = None
    rule_groups: list[dict[str, Any]] = field(default_factory=list)
    _started: list[Any] = field(default_factory=list)

    def notifications(self, smtp: SmtpSink) -> dict[str, Any]:
        return {
            "slack": {"channel": "#slm-alerts", "apiURLSecretRef": {"name": "slack", "key": "url"},
                      "severities": ["critical", "warning"]},
            "email": {"to": ["sre@example.com"], "from": "slm@example.com", "smarthost": smtp.smarthost,
                      "requireTLS": False, "severities": ["critical"]},
            "webhook": {"urlSecretRef": {"name": "hook", "key": "url"}},
        }  # fmt: skip

    def start(self, model_dir: str) -> MonitoringPlane:
        from slm_devtools.alertmanager_yaml import alertmanager_yaml
        from slm_operator.monitoring.notifications import render_alertmanager_config_spec
        from slm_operator.monitoring.rules import render_rule_groups

        try:
            self.smtp = self._start(SmtpSink())
            self.hooks = self._start(WebhookSink())
            spec = render_alertmanager_config_spec(
                name=self.name, namespace=self.namespace, notifications=self.notifications(self.smtp)
            )
            assert spec is not None
            spec["route"].update(
                {"groupWait": f"{self.group_wait_s:g}s", "groupInterval": "1s", "repeatInterval": "1h"}
            )
            secrets = {
                self.namespace: {"slack": {"url": self.hooks.url("/slack")}, "hook": {"url": self.hooks.url("/hook")}}
            }
            config = alertmanager_yaml([(self.namespace, f"slm-{self.name}", spec)], secrets=secrets)
            self.alertmanager = self._start(Alertmanager(self.workdir / "alertmanager", config))
            env = {"SLM_MODEL": model_dir, "SLM_MODEL_NAME": self.model_name, "SLM_FAULTS_ADMIN": "true",
                   "SLM_MAX_NEW_TOKENS": "16", **self.server_env}  # fmt: skip
            self.server = self._start(SlmServer(self.workdir / "server", env=env))
            self.rule_groups = render_rule_groups(name=self.name, namespace=self.namespace, alerts=self.alerts)
            interval = f"{self.interval_s:g}s"
            self.prometheus = self._start(
                Prometheus(
                    self.workdir / "prometheus",
                    scrape_configs=[
                        scrape_config(
                            name=self.name,
                            namespace=self.namespace,
                            targets=[self.server.address],
                            pod=self.pod,
                            interval=interval,
                        )
                    ],
                    rule_groups=self.rule_groups,
                    alertmanagers=[self.alertmanager.address],
                    interval=interval,
                )
            )
            self.load = self._start(
                LoadGenerator(
                    self.server.url,
                    rate=self.load_rate,
                    concurrency=2,
                    body={"model": self.model_name, "prompt": "The quick brown fox", "max_tokens": 8},
                )
            )
            wait_until(self.prometheus.targets_up, timeout=30, what="server target up")
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
