"""`make demo` (also `slm-demo`): the whole product working on one machine, step by step.

A local control plane with fake GPU nodes → kube-prometheus-stack's monitoring (the real Prometheus
Operator, and the Prometheus and Alertmanager it generates, run here) → the Helm chart → the operator
(a local process holding only the chart's ServiceAccount token) → the SLMDeployments in examples/ →
the real server with the tiny model, run at the address of tiny-demo's pod → Prometheus discovering it
through the ServiceMonitor and loading the PrometheusRule, Alertmanager routing by the
AlertmanagerConfig, all as the Prometheus Operator generated them → loopback SMTP and Slack/webhook
sinks; the chart's OpenTelemetry Collector and VictoriaLogs (as `helm template` renders them with
`logs.enabled=true`) shipping the pod's log lines, written where the container runtime writes them. Then
load, a fault, the alert firing and its notifications beside a log query of the faulted deployment and
its answer, recovery, and a threshold edited in the resource reaching Prometheus' evaluation. Serving
pods are faked by KWOK (no GPU here); the one that really runs is tiny-demo's, with the environment and
volumes the operator put in its Deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import dataplane, logplane
from .cluster import ClusterBase, LocalCluster, wait_for
from .localpods import LocalKubelet
from .operator_process import OperatorProcess
from .promstack import PrometheusStack, StackSettings
from .tools import REPO_ROOT, tool, versions

NAMESPACE = "llm"
SYSTEM_NAMESPACE = "slm-system"
RELEASE = "slm-monitoring"
DEMO = "tiny-demo"
LLAMA_EXAMPLE = "llamacpp.yaml"  # the second model: llama.cpp's llama-server behind the monitoring sidecar
ALERT = "SLMHighErrorRate"
EXAMPLES = REPO_ROOT / "examples"
CHART = REPO_ROOT / "charts" / "slm-monitoring"


class DemoFailed(RuntimeError):
    def __init__(self, step: str, cause: BaseException, fix: str) -> None:
        super().__init__(f"step '{step}' failed: {cause}")
        self.step, self.cause, self.fix = step, cause, fix


@dataclass
class Progress:
    total: int
    number: int = 0
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def step(self, title: str, fix: str = "") -> Iterator[None]:
        self.number += 1
        print(f"[{self.number:2d}/{self.total}] {title}", flush=True)
        began = time.monotonic()
        try:
            yield
        except DemoFailed:
            raise
        except Exception as exc:
            raise DemoFailed(title, exc, fix) from exc
        print(f"        done in {time.monotonic() - began:.1f}s", flush=True)


def say(text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"        {line}", flush=True)


@dataclass
class Summary:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str, value: object) -> None:
        self.rows.append((what, str(value)))

    def print(self, value_width: int = 64) -> None:
        width = max(len(what) for what, _ in self.rows)
        line = "+" + "-" * (width + 2) + "+" + "-" * (value_width + 2) + "+"
        print(line)
        for what, value in self.rows:
            chunks = textwrap.wrap(value, value_width) or [""]
            for index, chunk in enumerate(chunks):
                label = what if index == 0 else ""
                print(f"| {label.ljust(width)} | {chunk.ljust(value_width)} |")
        print(line, flush=True)


class Demo:
    def __init__(self, workdir: Path, *, keep_running: bool, stop: threading.Event) -> None:
        self.workdir = workdir
        self.keep_running = keep_running
        self.stop = stop
        self.summary = Summary()
        self.progress = Progress(total=15)
        self.llama: dict[str, Any] = {}

    # --- helpers ------------------------------------------------------------------------------
    def helm(self, cluster: ClusterBase, *args: str) -> str:
        import subprocess

        argv = [tool("helm"), f"--kubeconfig={cluster.kubeconfig}", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    @staticmethod
    def condition(cluster: ClusterBase, name: str, kind: str) -> dict[str, Any]:
        status = cluster.kubectl_json("get", "slmdeployment", name, "-n", NAMESPACE).get("status", {})
        return next((c for c in status.get("conditions", []) if c["type"] == kind), {})

    @staticmethod
    def retention(logs: logplane.LogPlane) -> str:
        args = logplane.store_objects(logs.docs)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["args"]
        return next((a.split("=", 1)[1] for a in args if a.startswith("-retentionPeriod=")), "VictoriaLogs' default")

    @staticmethod
    def failed_requests(store: logplane.VictoriaLogs | None, timeout: float = 60) -> logplane.LogQueryResult:
        """The log query of tiny-demo's failed requests, once the store has at least one."""
        assert store is not None

        def answered() -> logplane.LogQueryResult | None:
            result = logplane.deployment_log_query(store, NAMESPACE, DEMO, where="http.response.status_code:>=500")
            return result if result.entries else None

        return dataplane.wait_until(answered, timeout=timeout, interval=0.5,
                                    what=f"a failed request of {NAMESPACE}/{DEMO} in VictoriaLogs")

    # --- the demo -----------------------------------------------------------------------------
    def run(self) -> None:
        p = self.progress
        with contextlib.ExitStack() as stack:
            with p.step("Start a local Kubernetes control plane with fake GPU nodes (etcd, kube-apiserver, "
                        "controller-manager, scheduler, KWOK)", fix="run `make deps`; see the component log named"):
                cluster = stack.enter_context(LocalCluster.start(self.workdir / "cluster", keep=True))
                say(f"API server {cluster.server}, ready in {cluster.boot_seconds:.1f}s")
                say(cluster.kubectl("get", "nodes", "-o", "custom-columns=NODE:.metadata.name,"
                                    "GPUS:.status.allocatable.nvidia\\.com/gpu").stdout)

            with p.step("Install kube-prometheus-stack's monitoring: the Prometheus Operator, and the Prometheus "
                        "and Alertmanager it generates (run here at their pods' addresses)",
                        fix="see the logs under the demo's work directory, stack/"):
                monitoring = PrometheusStack(cluster, self.workdir / "stack", settings=StackSettings())
                stack.callback(monitoring.stop)
                monitoring.start()
                assert monitoring.operator is not None and monitoring.prometheus_pod is not None
                say(f"Prometheus Operator {versions()['PROMETHEUS_OPERATOR_VERSION']} (log under {self.workdir})")
                say(f"Prometheus {monitoring.prometheus.url} (pod IP {monitoring.prometheus_pod.ip}), "
                    f"Alertmanager {monitoring.alertmanager.url}")
                say(cluster.kubectl("get", "prometheus,alertmanager,statefulset,pods", "-n", "monitoring").stdout)

            with p.step("Install the Helm chart (with its shared recording rules for kube-prometheus-stack's "
                        "Prometheus)", fix="the message names the object that did not get through and why"):
                # The release label on the recording rules only: a real install sets kubePrometheusStack.release,
                # which labels the operator's ServiceMonitor too, and the operator here is a local process, not
                # a pod Prometheus could scrape.
                self.helm(cluster, "install", RELEASE, str(CHART), "--namespace", SYSTEM_NAMESPACE,
                          "--create-namespace", "--wait", "--timeout", "180s",
                          "--set", f"recordingRules.labels.release={monitoring.settings.release}")
                say(f"chart release '{RELEASE}' in {SYSTEM_NAMESPACE}")
                say(cluster.kubectl("get", "deploy,sa,svc,prometheusrule", "-n", SYSTEM_NAMESPACE).stdout)
                (shared_rules,) = cluster.kubectl_json(
                    "get", "prometheusrule", "-n", SYSTEM_NAMESPACE, "-l",
                    f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=recording-rules")["items"]
                shared = monitoring.wait_rules_loaded(SYSTEM_NAMESPACE, shared_rules["metadata"]["name"], timeout=60)
                recorded = sum(len(g["rules"]) for g in shared)
                say(f"Prometheus evaluates the chart's {recorded} shared recording rules "
                    f"(PrometheusRule {SYSTEM_NAMESPACE}/{shared_rules['metadata']['name']})")
                self.summary.add("shared recording rules loaded (chart)", recorded)

            with p.step("Run the operator with only the chart's ServiceAccount token (its pod is faked by KWOK)",
                        fix="see the operator log path printed below"):
                account = cluster.kubectl(
                    "get", "deployment", "-n", SYSTEM_NAMESPACE, "-l",
                    f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator",
                    "-o", "jsonpath={.items[0].spec.template.spec.serviceAccountName}").stdout.strip()
                operator = OperatorProcess(cluster.kubeconfig_for_service_account(SYSTEM_NAMESPACE, account),
                                           self.workdir / "operator", resync_seconds=5)
                stack.callback(operator.stop)
                operator.start()
                say(f"system:serviceaccount:{SYSTEM_NAMESPACE}:{account}; log {operator.log_path}")

            with p.step("Start the notification sinks (loopback SMTP server and Slack-compatible webhook)"):
                smtp = dataplane.SmtpSink().start()
                stack.callback(smtp.stop)
                webhook = dataplane.WebhookSink().start()
                stack.callback(webhook.stop)
                say(f"SMTP {smtp.smarthost}, webhook {webhook.url('/')}")

            with p.step(f"Apply the SLMDeployments in examples/ to namespace {NAMESPACE}",
                        fix="`kubectl describe slmd` shows the conditions"):
                cluster.kubectl("create", "namespace", NAMESPACE)
                cluster.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
                dataplane.create_model_volume(cluster, NAMESPACE)
                for secret, key, value in (("slack", "url", webhook.url("/slack")),
                                           ("hook", "url", webhook.url("/hook")), ("smtp", "password", "unused")):
                    cluster.kubectl("create", "secret", "generic", secret, "-n", NAMESPACE,
                                    f"--from-literal={key}={value}")
                for path in sorted(EXAMPLES.glob("*.yaml")):
                    resource = yaml.safe_load(path.read_text())
                    if path.name == LLAMA_EXAMPLE:
                        self.llama = resource
                    if resource["metadata"]["name"] == DEMO:
                        resource["spec"]["monitoring"]["notifications"]["email"]["smarthost"] = smtp.smarthost
                    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(resource))
                wait_for(f"{DEMO} to be Ready", lambda: self.condition(cluster, DEMO, "Ready").get("status") == "True",
                         timeout=120)
                wait_for(f"{DEMO} MonitoringReady", lambda: self.condition(
                    cluster, DEMO, "MonitoringReady").get("status") == "True", timeout=60)
                say(cluster.kubectl("get", "slmdeployments", "-n", NAMESPACE).stdout)
                children = cluster.kubectl_json("get", "slmdeployment", DEMO, "-n", NAMESPACE)["status"]["children"]
                self.summary.add(f"objects owned by {DEMO}", ", ".join(
                    c if isinstance(c, str) else f"{c['kind']}/{c['name']}" for c in children))

            with p.step("Ship the pods' logs: the chart's OpenTelemetry Collector and VictoriaLogs (as helm "
                        "template renders them with logs.enabled=true), run here for tiny-demo's node",
                        fix="see otelcol.log and victoria-logs.log under the demo's work directory, node/"):
                pod = LocalKubelet(cluster, self.workdir / "pods").running_pod(
                    NAMESPACE, dataplane.server_pod_selector(cluster, NAMESPACE, DEMO))
                node = pod["spec"]["nodeName"]
                logs = logplane.LogPlane(cluster, self.workdir / "node", node, release=RELEASE,
                                         namespace=SYSTEM_NAMESPACE)
                stack.callback(logs.stop)
                logs.start()
                assert logs.store is not None
                say(f"collector for node {node} reading {logs.pods_dir}; VictoriaLogs {logs.store.url} "
                    f"(retention {self.retention(logs)})")

            with p.step("Run tiny-demo's pod here: the real server with the tiny model, at the pod's address, "
                        "with the environment and volumes of the operator's Deployment",
                        fix="see the server log in the demo's work directory (pods/)"):
                from slm_devtools.tinymodel import ensure_tiny_model

                model_dir = ensure_tiny_model(log=say)
                models = dataplane.model_claim_dir(self.workdir, model_dir, "tiny-gpt2")
                kubelet = LocalKubelet(cluster, self.workdir / "pods", claims={"models": models},
                                       pod_logs_dir=logs.pods_dir)
                stack.callback(kubelet.stop)
                server = dataplane.SlmServer(kubelet.run(pod, env=dataplane.FAULT_ADMIN_ENV, timeout=300))
                say(f"pod {pod['metadata']['name']} has IP {server.pod.ip}; its server answers here at {server.url}")
                say(f"its log lines go where the container runtime writes them: {server.pod.containers[0].cri_log}")

            with p.step(f"Run {self.llama['metadata']['name']}'s pod here: the real llama-server (llama.cpp) with the "
                        "tiny model in GGUF, and the monitoring sidecar in front of it, as the operator rendered them",
                        fix="see llamacpp.log and slm-sidecar.log in the demo's work directory (pods/)"):
                from slm_devtools.gguf import ensure_tiny_gguf

                llama_name = self.llama["metadata"]["name"]
                source = self.llama["spec"]["model"]
                # The example's file in the example's claim: here the tiny model in GGUF (no download here).
                gguf = models / source["source"]["pvc"]["subPath"] / source["file"]
                gguf.parent.mkdir(parents=True, exist_ok=True)
                if not gguf.exists():
                    gguf.symlink_to(ensure_tiny_gguf(log=say))
                llama_pod = kubelet.run(kubelet.running_pod(
                    NAMESPACE, dataplane.server_pod_selector(cluster, NAMESPACE, llama_name)), timeout=180)
                say(f"pod {llama_pod.pod['metadata']['name']}: llama-server at {llama_pod.url('runtime')}, "
                    f"the sidecar (logs, perplexity, drift) at {llama_pod.url('http')}")

            with p.step("Prometheus finds the server through the ServiceMonitor and loads the PrometheusRule; "
                        "Alertmanager routes by the AlertmanagerConfig — all as the Prometheus Operator generated "
                        "them", fix="the message names the object that did not get through and why"):
                prometheus, alertmanager = monitoring.prometheus, monitoring.alertmanager
                # Up to the config reloader's 3-minute check if tiny-demo's job came in a later change of
                # Prometheus' configuration than the first (PrometheusStack.explain_service_monitor says why).
                targets = monitoring.wait_target_up(NAMESPACE, DEMO, timeout=240)
                groups = monitoring.wait_rules_loaded(NAMESPACE, DEMO, timeout=60)
                monitoring.wait_alertmanager_config(NAMESPACE, DEMO, timeout=60)
                rules = sum(len(g["rules"]) for g in groups)
                say(f"target {targets[0]['scrapeUrl']} (instance {targets[0]['labels']['instance']}) is up; "
                    f"{rules} rules from PrometheusRule {NAMESPACE}/{DEMO} loaded")
                self.summary.add("rules loaded (alerts + recording)", rules)

            with p.step("Drive bounded load and wait for the recording rules to have data"):
                load = dataplane.LoadGenerator(server.url, rate=4, concurrency=2, limit=3000,
                                               body={"model": server.env.get("SLM_MODEL_NAME", "tiny-gpt2"),
                                                     "prompt": "The history of the city", "max_tokens": 8})
                stack.callback(load.stop)
                load.start()
                pool = f"serviceMonitor/{NAMESPACE}/{DEMO}/0"
                wait_for("the scrape target to be up", lambda: prometheus.targets_up(pool), timeout=60)
                wait_for("successful requests in Prometheus", lambda: bool(prometheus.query(
                    f'sum(rate(api_requests_total{{namespace="{NAMESPACE}",job="{DEMO}",status="200"}}[30s])) > 0')),
                    timeout=90)
                up = [t for t in prometheus.targets(pool) if t["health"] == "up"]
                self.summary.add(f"{DEMO} scrape targets up", f"{len(up)}/{len(prometheus.targets(pool))}")
                # The second model: the same recorded series and dashboards, from llama.cpp's own metrics.
                llama_load = dataplane.LoadGenerator(llama_pod.url("http"), rate=1, concurrency=1, limit=600, body={
                    "model": self.llama["spec"]["model"]["servedName"], "prompt": "The history of the city",
                    "max_tokens": 8})
                stack.callback(llama_load.stop)
                llama_load.start()
                llama = f'namespace="{NAMESPACE}",job="{llama_name}"'
                monitoring.wait_target_up(NAMESPACE, llama_name, timeout=240)
                wait_for(f"{llama_name}'s generated tokens recorded from llama.cpp's metrics", lambda: bool(
                    prometheus.query(f"slm:generated_tokens:rate5m{{{llama}}} > 0")), timeout=120)
                wait_for(f"{llama_name}'s perplexity recorded from the sidecar", lambda: bool(
                    prometheus.query(f"slm:request_perplexity_count:pod_total{{{llama}}} > 0")), timeout=60)
                fleet = sorted({r["metric"]["job"] for r in prometheus.query(
                    f'max by (job) (slm_model_info{{namespace="{NAMESPACE}"}})')})
                say(f"one dashboard, two runtimes: the fleet dashboard lists {', '.join(fleet)} in {NAMESPACE}")
                tokens = float(prometheus.query(f"sum(slm:generated_tokens:rate5m{{{llama}}})")[0]["value"][1])
                self.summary.add(f"{llama_name} (llama.cpp) generated tokens/s", f"{tokens:.2f}")
                self.summary.add("deployments on the fleet dashboard", ", ".join(fleet))

            with p.step(f"Inject a fault (50% errors) and wait for {ALERT} to fire and notify"):
                fault_at = time.time()
                server.set_faults(error_rate=0.5)
                wait_for(f"{ALERT} firing in Prometheus", lambda: any(
                    a["labels"]["alertname"] == ALERT and a["state"] == "firing"
                    for a in prometheus.api("alerts")["alerts"]), timeout=120)
                fired = time.time()
                slack = webhook.wait_for(lambda r: r.path == "/slack" and ALERT in json.dumps(r.body)
                                         and "RESOLVED" not in json.dumps(r.body), 90, "the Slack message")
                hook = webhook.wait_for(lambda r: r.path == "/hook" and r.body.get("status") == "firing", 90,
                                        "the webhook notification")
                mail = smtp.wait_for(lambda m: ALERT in m.subject, 90, "the e-mail")
                say(f"firing after {fired - fault_at:.1f}s; Slack after {slack.at - fault_at:.1f}s, "
                    f"webhook after {hook.at - fault_at:.1f}s, e-mail '{mail.subject}'")
                failed = self.failed_requests(logs.store)
                say(f"the failed requests of {NAMESPACE}/{DEMO} in its logs (LogsQL, on the local VictoriaLogs):")
                say(f"  {failed.command}")
                say(f"{len(failed.entries)} lines, the newest:")
                say(logplane.format_entries(failed.entries[:3]))
                self.summary.add(f"{DEMO} failed requests in the logs", f"{len(failed.entries)} lines; query: "
                                 f"{failed.query}")
                self.summary.add("fault → alert firing", f"{fired - fault_at:.1f}s")
                self.summary.add("fault → Slack / webhook", f"{slack.at - fault_at:.1f}s / {hook.at - fault_at:.1f}s")

            with p.step("Stop the fault and wait for the resolved notification"):
                recovered_at = time.time()
                server.set_faults(error_rate=0.0)
                resolved = webhook.wait_for(lambda r: r.path == "/hook" and r.body.get("status") == "resolved",
                                            180, "the resolved notification")
                say(f"resolved notification after {resolved.at - recovered_at:.1f}s")
                self.summary.add("recovery → resolved notification", f"{resolved.at - recovered_at:.1f}s")
                self.summary.add("notifications received", f"{len(webhook.received.snapshot())} webhook/Slack, "
                                 f"{len(smtp.received.snapshot())} e-mail")

            with p.step("Edit the error-rate threshold in the SLMDeployment and watch the rule follow"):
                edited_at = time.monotonic()
                patch = {"spec": {"monitoring": {"alerts": {"errorRate": {"threshold": 0.2}}}}}
                cluster.kubectl("patch", "slmdeployment", DEMO, "-n", NAMESPACE, "--type=merge",
                                "-p", json.dumps(patch))

                def rule_expr() -> str:
                    groups = cluster.kubectl_json("get", "prometheusrule", DEMO, "-n", NAMESPACE)["spec"]["groups"]
                    return next(str(r["expr"]) for g in groups for r in g["rules"] if r.get("alert") == ALERT)

                wait_for("the PrometheusRule to carry the new threshold", lambda: "0.2" in rule_expr(), timeout=30)
                took = time.monotonic() - edited_at
                say(f"{ALERT}: {' '.join(rule_expr().split())}")
                say(f"PrometheusRule updated {took:.1f}s after the edit")
                self.summary.add("threshold edit → PrometheusRule", f"{took:.1f}s")
                # Nothing of ours between here and Prometheus: the Prometheus Operator rewrites the rule
                # ConfigMap, the kubelet (stand-in) updates the volume, the config reloader reloads Prometheus.
                wait_for("Prometheus to evaluate the new threshold", lambda: any(
                    r.get("name") == ALERT and "> 0.2" in r.get("query", "")
                    for g in monitoring.loaded_rule_groups(NAMESPACE, DEMO) for r in g["rules"]), timeout=60)
                evaluated = time.monotonic() - edited_at
                say(f"Prometheus evaluates the new threshold {evaluated:.1f}s after the edit "
                    "(reloaded by the Prometheus Operator's config reloader)")
                self.summary.add("threshold edit → evaluated by Prometheus", f"{evaluated:.1f}s")

            with p.step("Summary"):
                self.summary.add("Prometheus UI", prometheus.url)
                self.summary.add("Alertmanager UI", alertmanager.url)
                self.summary.add("VictoriaLogs UI", f"{logs.store.url}/select/vmui/")
                self.summary.add("kubeconfig", str(cluster.kubeconfig))
                self.summary.print()
                if self.keep_running:
                    print("Everything stays up; press Ctrl-C to stop.", flush=True)
                    self.stop.wait()
            print("Stopping everything …", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slm-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep-running", action="store_true", help="keep everything up until Ctrl-C")
    parser.add_argument("--workdir", type=Path, help="where logs and data go (default: a new temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"slm-monitoring demo — logs and data in {workdir}", flush=True)
    stop = threading.Event()

    def interrupted(*_: object) -> None:
        stop.set()
        raise KeyboardInterrupt  # unwinds every step's clean-up, as Ctrl-C does

    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    try:
        Demo(workdir, keep_running=args.keep_running, stop=stop).run()
    except KeyboardInterrupt:
        print("Interrupted; every process stopped.", file=sys.stderr)
        return 0 if args.keep_running else 130
    except DemoFailed as failure:
        print(f"\nDEMO FAILED at step '{failure.step}':\n  {type(failure.cause).__name__}: {failure.cause}",
              file=sys.stderr)
        if failure.fix:
            print(f"  What to do: {failure.fix}", file=sys.stderr)
        print(f"  Logs: {workdir}", file=sys.stderr)
        traceback.print_exception(failure.cause, file=sys.stderr)
        return 1
    print(f"Demo finished in {time.monotonic() - started:.0f}s; every process stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
