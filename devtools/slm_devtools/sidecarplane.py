"""The monitoring sidecar on the data plane: a runtime, the sidecar in front of it as the operator renders
it, the real Prometheus scraping the sidecar with the project's rules, and the real Alertmanager notifying a
loopback webhook. Everything listens on 127.0.0.1.

    python -m slm_devtools.sidecarplane [llamacpp|builtin]   # start it, print the URLs (Ctrl-C stops)

What runs, each its own process:

- the runtime: llama.cpp's `llama-server` (built by `make deps`) with exactly the arguments
  slm_operator.runtimes renders, serving the tiny model as GGUF (slm_devtools.gguf); or the built-in server
  (`python -m slm_server`) with the tiny model;
- the sidecar (`python -m slm_sidecar`) with the environment slm_operator.sidecar.render_sidecar gives its
  container (the Secret references given values here; ports and the listening address made loopback ones);
  its JSON lines go to a file (`Sidecar.records()`);
- the pinned Prometheus, which scrapes the sidecar every `interval` with the target labels the Prometheus
  Operator gives the pod's `http` endpoint (namespace, service, job, pod, container = the sidecar's
  container name), and evaluates the chart's shared recording rules as Helm ships them and the
  deployment's groups rendered by slm_operator.monitoring.rules for the runtime (the chart's
  `slm-shared.sidecar` group records the sidecar's perplexity for every runtime);
- the pinned Alertmanager, to which Prometheus sends its alerts, with one webhook receiver
  (slm_devtools.dataplane.WebhookSink) and a 1 s group wait.

A load generator (slm_devtools.runtimeplane.Load) is started on demand (`start_load`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slm_devtools.dataplane import LOOPBACK, ManagedProcess, WebhookSink, http_json, http_ok
from slm_devtools.runtimeplane import CHART_RULES, Load, LocalPrometheus, RuntimeServer, free_port
from slm_devtools.tools import REPO_ROOT, tool
from slm_operator.monitoring.rules import render_rule_groups
from slm_operator.runtimes import render_runtime
from slm_operator.sidecar import HEALTH_PATHS, SIDECAR_CONTAINER_NAME, render_sidecar

# The sidecar and the built-in server run from this checkout's sources.
PYTHONPATH = os.pathsep.join(str(REPO_ROOT / p) for p in ("sidecar", "server", "operator", "devtools", "."))
# The built-in server's readiness endpoint (the sidecar follows it for that runtime).
BUILTIN_HEALTH_PATH = "/readyz"


def sidecar_env(
    runtime: str,
    *,
    runtime_port: int,
    port: int,
    admin_port: int,
    served_model_name: str,
    secrets: Mapping[str, str],
    faults_admin: bool = True,
    log_outputs: str = "hash",
) -> dict[str, str]:
    """The sidecar container's environment as the operator renders it for `runtime`, made to run here:
    loopback addresses, the given ports, and each Secret reference replaced by `secrets[variable]`.

    The operator puts no sidecar in front of the built-in server (it has the same code inside); for the
    tests that run one anyway, `builtin` takes another runtime's rendering with SLM_RUNTIME and the health
    path set to the built-in server's."""
    rendered = render_sidecar(
        runtime=runtime if runtime in HEALTH_PATHS else "vllm",
        served_model_name=served_model_name,
        runtime_port=runtime_port,
        log_outputs=log_outputs,
        faults_admin=faults_admin,
        output_hash_key={"name": "slm-output-hash", "key": "key"} if "SLM_OUTPUT_HASH_KEY" in secrets else None,
        admin_token={"name": "slm-admin", "key": "token"} if "SLM_ADMIN_TOKEN" in secrets else None,
    )
    env: dict[str, str] = {}
    for item in rendered["env"]:
        env[item["name"]] = item["value"] if "value" in item else secrets[item["name"]]
    env.update(SLM_HOST=LOOPBACK, SLM_PORT=str(port), SLM_ADMIN_PORT=str(admin_port))
    if runtime not in HEALTH_PATHS:
        env.update(SLM_RUNTIME=runtime, SLM_UPSTREAM_HEALTH_PATH=BUILTIN_HEALTH_PATH)
    return env


@dataclass
class Sidecar:
    """`python -m slm_sidecar` with `env`, its JSON lines in `log`."""

    env: dict[str, str]
    log: Path
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.env['SLM_PORT']}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.env['SLM_ADMIN_PORT']}"

    def start(self, timeout: float = 120) -> Sidecar:
        env = {**self.env, "PYTHONPATH": PYTHONPATH}
        self.process = ManagedProcess("slm-sidecar", [sys.executable, "-m", "slm_sidecar"], self.log, env=env).start()
        self.process.wait_ready(lambda: http_ok(f"{self.url}/readyz"), timeout)
        return self

    def records(self) -> list[dict[str, Any]]:
        """Every JSON line the sidecar wrote so far."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        found = []
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    found.append(record)
        return found

    def set_faults(self, **faults: Any) -> None:
        """POST /admin/faults on the admin listener (`errorRate`, `addedLatencySeconds`, `degradedOutput`)."""
        headers = {"Authorization": f"Bearer {self.env['SLM_ADMIN_TOKEN']}"} if "SLM_ADMIN_TOKEN" in self.env else {}
        http_json(f"{self.admin_url}/admin/faults", method="POST", body=faults, headers=headers)

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:  # noqa: S310 - loopback
            return str(response.read().decode())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=30)


@dataclass
class BuiltinRuntime:
    """The built-in server (`python -m slm_server`) with a model directory, as a sidecar's runtime."""

    model_dir: Path
    served_model_name: str
    log: Path
    port: int = 0
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 240) -> BuiltinRuntime:
        self.port = self.port or free_port()
        env = {
            "PYTHONPATH": PYTHONPATH, "SLM_MODEL": str(self.model_dir), "SLM_SERVED_MODEL_NAME": self.served_model_name,
            "SLM_HOST": LOOPBACK, "SLM_PORT": str(self.port), "SLM_LOG_REQUESTS": "false", "SLM_GPU_METRICS": "false",
            "SLM_DRIFT_ENABLED": "false", "SLM_PREFIX_CACHE_MIB": "0",
        }  # fmt: skip
        self.process = ManagedProcess("slm-server", [sys.executable, "-m", "slm_server"], self.log, env=env).start()
        self.process.wait_ready(lambda: http_ok(f"{self.url}{BUILTIN_HEALTH_PATH}"), timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=30)


@dataclass
class AlertingPrometheus(LocalPrometheus):
    """LocalPrometheus that sends its alerts to `alertmanager` (host:port)."""

    alertmanager: str = ""

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [self.alertmanager]}]}]}
        return config


@dataclass
class LocalAlertmanager:
    """The pinned Alertmanager, one webhook receiver for every alert, no clustering."""

    workdir: Path
    webhook_url: str
    group_wait: str = "1s"
    port: int = 0
    process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "route": {"receiver": "webhook", "group_by": ["alertname", "namespace", "job"],
                      "group_wait": self.group_wait, "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "webhook", "webhook_configs": [{"url": self.webhook_url, "send_resolved": True}]}],
        }  # fmt: skip

    def start(self, timeout: float = 60) -> LocalAlertmanager:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "alertmanager.yaml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = self.port or free_port()
        args = [tool("alertmanager"), f"--config.file={config}", f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address={self.address}", "--cluster.listen-address="]  # fmt: skip
        self.process = ManagedProcess("alertmanager", args, self.workdir / "alertmanager.log").start()
        self.process.wait_ready(lambda: http_ok(f"http://{self.address}/-/ready"), timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class SidecarPlane:
    """One deployment's pod: `runtime` with the sidecar in front, scraped, evaluated and alerted on."""

    runtime: str  # llamacpp | builtin
    model: Path  # llama.cpp: the .gguf file; builtin: the model directory
    workdir: Path
    name: str = "phi"
    namespace: str = "llm"
    served_model_name: str = "tiny"
    alerts: Mapping[str, Any] | None = None
    interval: str = "1s"
    secrets: Mapping[str, str] = field(default_factory=dict)
    runtime_server: RuntimeServer | BuiltinRuntime | None = None
    sidecar: Sidecar | None = None
    sink: WebhookSink | None = None
    alertmanager: LocalAlertmanager | None = None
    prometheus: AlertingPrometheus | None = None
    load: Load | None = None
    pod: str = ""

    @property
    def runtime_url(self) -> str:
        assert self.runtime_server is not None
        return self.runtime_server.url

    def target_labels(self) -> dict[str, str]:
        """What the Prometheus Operator gives the pod's `http` endpoint: the sidecar's container."""
        return {"namespace": self.namespace, "service": self.name, "job": self.name, "pod": self.pod,
                "container": SIDECAR_CONTAINER_NAME}  # fmt: skip

    def rule_files(self) -> list[Path]:
        """The chart's shared rules as Helm ships them, then the deployment's groups."""
        groups = render_rule_groups(
            name=self.name, namespace=self.namespace, alerts=self.alerts, runtime=self.runtime
        )
        own = self.workdir / "deployment-rules.yaml"
        own.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        return [CHART_RULES, own]

    def start(self) -> SidecarPlane:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pod = f"{self.name}-6d9f8b7c5-s1d3c"
        try:
            self._start_runtime()
            runtime_port = int(self.runtime_url.rsplit(":", 1)[1])
            env = sidecar_env(self.runtime, runtime_port=runtime_port, port=free_port(), admin_port=free_port(),
                              served_model_name=self.served_model_name, secrets=self.secrets)  # fmt: skip
            self.sidecar = Sidecar(env, self.workdir / "sidecar.log").start()
            self.sink = WebhookSink().start()
            self.alertmanager = LocalAlertmanager(self.workdir / "alertmanager", self.sink.url("/hook")).start()
            sidecar_port = self.sidecar.env["SLM_PORT"]
            self.prometheus = AlertingPrometheus(
                self.workdir / "prometheus", f"{LOOPBACK}:{sidecar_port}", "/metrics", self.target_labels(),
                self.rule_files(), interval=self.interval, alertmanager=self.alertmanager.address,
            )  # fmt: skip
            self.prometheus.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_runtime(self) -> None:
        if self.runtime == "builtin":
            self.runtime_server = BuiltinRuntime(self.model, self.served_model_name, self.workdir / "server.log")
            self.runtime_server.start()
            return
        container = render_runtime(self.runtime, model=str(self.model), served_model_name=self.served_model_name,
                                   port=free_port(), max_context=512, gpus=0, host=LOOPBACK,
                                   extra_args=["--threads", "1"])  # fmt: skip
        self.runtime_server = RuntimeServer(container, self.workdir / f"{self.runtime}.log").start()

    def start_load(self, body: Mapping[str, Any], rate: float = 4.0) -> Load:
        """Completions through the sidecar at about `rate` per second (one in flight)."""
        assert self.sidecar is not None
        self.stop_load()
        self.load = Load(self.sidecar.url, body, rate=rate).start()
        return self.load

    def stop_load(self) -> None:
        if self.load is not None:
            self.load.stop()
            self.load = None

    def stop(self) -> None:
        self.stop_load()
        for thing in (self.prometheus, self.alertmanager, self.sink, self.sidecar, self.runtime_server):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.stop()

    def selector(self) -> str:
        return f'namespace="{self.namespace}",job="{self.name}"'


def main(argv: list[str] | None = None) -> int:
    runtime = (argv if argv is not None else sys.argv[1:] or ["llamacpp"])[0]
    workdir = Path.cwd() / ".sidecarplane"
    if runtime == "builtin":
        from slm_devtools.tinymodel import ensure_tiny_model

        model = ensure_tiny_model(log=print)
    else:
        from slm_devtools.gguf import ensure_tiny_gguf

        model = ensure_tiny_gguf(log=print)
    plane = SidecarPlane(runtime, model, workdir).start()
    assert plane.sidecar is not None and plane.prometheus is not None and plane.alertmanager is not None
    plane.start_load({"model": plane.served_model_name, "prompt": "The quick brown fox", "max_tokens": 8})
    print(f"runtime {plane.runtime_url}   sidecar {plane.sidecar.url}   prometheus {plane.prometheus.api.url}   "
          f"alertmanager http://{plane.alertmanager.address}   (Ctrl-C stops)")  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        plane.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
