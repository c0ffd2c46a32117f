"""The monitoring stack as kube-prometheus-stack users have it: the real Prometheus Operator in the loop.

`PrometheusOperator` runs the pinned Prometheus Operator (built by `make deps`) as a process against
the cluster, under the ServiceAccount and the RBAC its release ships (example/rbac). `PrometheusStack`
creates what kube-prometheus-stack's chart creates for it with its default values — a `Prometheus`
selecting ServiceMonitors, PodMonitors and PrometheusRules by the `release` label in every namespace,
an `Alertmanager` selecting every AlertmanagerConfig, their Services and Alertmanager's base
configuration Secret — and then runs the StatefulSet pods the Prometheus Operator generated from them
as local processes (slm_devtools.localpods): Prometheus, Alertmanager and their config reloaders,
with the Secrets and ConfigMaps the Prometheus Operator writes projected as volumes and kept current.

The one place where the generated configuration is adapted for running outside a pod is
`adapt_prometheus_config` (and its small sibling `adapt_alertmanager_config`):

1. **API server address and credentials**: Prometheus' Kubernetes service discovery, configured for
   in-cluster use (the API server at kubernetes.default.svc, the token at its fixed path), gets a
   `kubeconfig_file` naming the same API server at its local address, the cluster CA, and the token
   the kubelet stand-in projected for the Prometheus pod's own ServiceAccount (same identity, same RBAC).
2. **Paths**: file paths in the configuration are mount paths inside the container; they become the
   local directories of the same volumes.
3. **Pod network**: a target address `<pod IP>:<port>` found through Endpoints becomes
   `<local twin>:<port>` (cluster.PodNetwork), and the `instance` label keeps the pod IP, as in a
   cluster. (Pod IPs cannot themselves be loopback addresses: Endpoints and EndpointSlices refuse them.)

Everything else — which objects are selected, the scrape jobs and their relabelling, the rule files,
Alertmanager's routing tree and receivers, when to reload — is the Prometheus Operator's and its
config reloader's doing. Timing differs from kube-prometheus-stack's defaults only where a test
would otherwise wait minutes (scrape and evaluation intervals, Alertmanager's grouping delays), all
in `StackSettings`.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .cluster import ClusterBase, Component, KubectlError, PodNetwork, free_port, spawn, tail, wait_for
from .localpods import Adapter, LocalKubelet, LocalPod
from .tools import ToolMissing, bin_dir, tool, versions

MONITORING_API = "monitoring.coreos.com"


class NotConsumed(AssertionError):
    """An object the operator wrote did not reach Prometheus or Alertmanager: the message says which and why."""


# ---- versions -------------------------------------------------------------------------------------


def prometheus_version() -> str:
    """Prometheus 3.x is published to the Go module proxy as v0.3MM.P: the pinned v0.315.1 is v3.15.1."""
    module = versions()["PROMETHEUS_VERSION"]
    match = re.fullmatch(r"v0\.3(\d\d)\.(\d+)", module)
    if not match:
        raise ValueError(f"PROMETHEUS_VERSION {module} is not a Prometheus 3 module version (v0.3MM.P)")
    return f"v3.{int(match[1])}.{match[2]}"


def alertmanager_version() -> str:
    return versions()["ALERTMANAGER_VERSION"]


def rbac_dir() -> Path:
    path = bin_dir() / "prometheus-operator-rbac"
    if not path.is_dir():
        raise ToolMissing(f"{path} missing: run `make deps` (builds the Prometheus Operator and fetches its RBAC).")
    return path


def selector_string(selector: Mapping[str, Any] | None) -> str:
    """A LabelSelector as kubectl's `-l` syntax (the API server then applies its own semantics)."""
    if selector is None:
        raise ValueError("a nil selector selects nothing")
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        parts.append({"In": f"{key} in ({','.join(values)})", "NotIn": f"{key} notin ({','.join(values)})",
                      "Exists": key, "DoesNotExist": f"!{key}"}[op])
    return ",".join(parts)


# ---- the Prometheus Operator process ---------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


class PrometheusOperator:
    """The pinned Prometheus Operator, running as its own ServiceAccount with the RBAC of its release."""

    ACCOUNT = "prometheus-operator"

    def __init__(self, cluster: ClusterBase, workdir: Path, *, namespace: str = "monitoring") -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.namespace = namespace
        self.component: Component | None = None
        self.port = 0

    def start(self, timeout: float = 90) -> PrometheusOperator:
        binary = tool("prometheus-operator")
        tool("prometheus-config-reloader")
        self.cluster.install_prometheus_operator_crds()
        ensure_namespace(self.cluster, self.namespace)
        apply_release_rbac(self.cluster, self.namespace)
        kubeconfig = self.cluster.kubeconfig_for_service_account(self.namespace, self.ACCOUNT, hours=24)
        self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.component = spawn("prometheus-operator", [
            binary, f"--web.listen-address=127.0.0.1:{self.port}",
            f"--prometheus-config-reloader=quay.io/prometheus-operator/prometheus-config-reloader:"
            f"{versions()['PROMETHEUS_OPERATOR_VERSION']}",
            # Status on ServiceMonitors (which Prometheus accepted them): off by default in 0.85.
            "--feature-gates=StatusForConfigurationResources=true",
            "--log-level=info", "--log-format=logfmt",
        ], self.workdir, env={"KUBECONFIG": str(kubeconfig)})

        def healthy() -> bool:
            assert self.component is not None
            if not self.component.alive():
                raise RuntimeError(self.component.failure())
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return bool(response.status == 200)

        wait_for("the Prometheus Operator to be healthy", healthy, timeout=timeout, on_timeout=self.log_tail)
        return self

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.component.log, lines) if self.component else ""

    def errors_about(self, namespace: str, name: str) -> list[str]:
        """The errors the Prometheus Operator logged about an object (its Events only say "invalid rule")."""
        if self.component is None:
            return []
        found: list[str] = []
        for line in self.component.log.read_text(errors="replace").splitlines():
            about = f"object={namespace}/{name}" in line or (
                re.search(rf"[a-z-]+={re.escape(name)}(\s|$)", line) and re.search(
                    rf"[a-z-]*namespace={re.escape(namespace)}(\s|$)", line))
            error = re.search(r'\berr(?:or)?="((?:[^"\\]|\\.)*)"', line)
            if about and error and error[1] not in found and error[1] != "invalid rule":
                found.append(error[1].replace('\\"', '"'))
        return found

    def stop(self) -> None:
        if self.component:
            self.component.stop()


def ensure_namespace(cluster: ClusterBase, name: str) -> None:
    if cluster.kubectl("get", "namespace", name, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", name, check=False)


def apply_release_rbac(cluster: ClusterBase, namespace: str) -> None:
    """The ServiceAccounts, ClusterRoles and bindings the pinned release ships, bound in `namespace`."""
    documents = []
    for path in sorted(rbac_dir().glob("*.yaml")):
        for doc in _documents(path):
            if doc["kind"] == "ServiceAccount":
                doc["metadata"]["namespace"] = namespace
            for subject in doc.get("subjects") or []:
                subject["namespace"] = namespace
            documents.append(doc)
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}))


# ---- the adaptation for running outside a pod --------------------------------------------------


def _map_strings(value: Any, mapper: Any) -> Any:
    if isinstance(value, str):
        return mapper(value)
    if isinstance(value, list):
        return [_map_strings(item, mapper) for item in value]
    if isinstance(value, dict):
        return {key: _map_strings(item, mapper) for key, item in value.items()}
    return value


def pod_network_relabeling(network: PodNetwork, *, keep_instance: bool) -> list[dict[str, Any]]:
    """Relabel rules that send a target at a pod IP to the pod's local twin (see the module docstring)."""
    rules: list[dict[str, Any]] = []
    if keep_instance:
        # `instance` defaults to the final address; set it first, only where nothing else set it.
        rules.append({"source_labels": ["instance", "__address__"], "separator": ";", "regex": ";(.*)",
                      "target_label": "instance", "replacement": "$1", "action": "replace"})
    rules.append({"source_labels": ["__address__"], "regex": network.address_regex, "target_label": "__address__",
                  "replacement": network.local_replacement, "action": "replace"})
    return rules


def adapt_prometheus_config(config: dict[str, Any], *, pod: LocalPod, kubeconfig: Path) -> dict[str, Any]:
    """The Prometheus Operator's generated prometheus.yaml, made to run outside its pod (module docstring)."""
    adapted: dict[str, Any] = _map_strings(config, lambda s: pod.host_path("prometheus", s) if s.startswith("/") else s)

    def api_access(sd_configs: list[dict[str, Any]]) -> None:
        for sd in sd_configs:
            sd.pop("api_server", None)
            sd["kubeconfig_file"] = str(kubeconfig)

    network = pod.kubelet.network
    for job in adapted.get("scrape_configs") or []:
        if job.get("kubernetes_sd_configs"):
            api_access(job["kubernetes_sd_configs"])
            job["relabel_configs"] = [*(job.get("relabel_configs") or []),
                                      *pod_network_relabeling(network, keep_instance=True)]
    for manager in (adapted.get("alerting") or {}).get("alertmanagers") or []:
        if manager.get("kubernetes_sd_configs"):
            api_access(manager["kubernetes_sd_configs"])
            manager["relabel_configs"] = [*(manager.get("relabel_configs") or []),
                                          *pod_network_relabeling(network, keep_instance=False)]
    return adapted


def adapt_alertmanager_config(text: str, *, pod: LocalPod) -> str:
    """Alertmanager's generated configuration: only its file paths (templates, secrets) become local."""
    container = "alertmanager"
    mounts = sorted(((m["mountPath"], pod.host_path(container, m["mountPath"])) for m in next(
        c for c in pod.pod["spec"]["containers"] if c["name"] == container).get("volumeMounts") or []),
        key=lambda m: len(m[0]), reverse=True)
    for mount_path, local in mounts:
        text = re.sub(rf"(?<![\w/.]){re.escape(mount_path)}(?=/|['\"\s]|$)", local, text, flags=re.MULTILINE)
    return text


def _in_cluster_kubeconfig(pod: LocalPod, container: str, server: str) -> Path:
    """A kubeconfig with the credentials a pod's in-cluster client would use, at the API server's local address."""
    account = "/var/run/secrets/kubernetes.io/serviceaccount"
    token, ca = pod.host_path(container, f"{account}/token"), pod.host_path(container, f"{account}/ca.crt")
    if token.startswith(account):
        raise NotConsumed(f"{pod!r} has no ServiceAccount token mounted at {account} (automountServiceAccountToken "
                          "off?): Prometheus could not discover anything through the API server")
    path = pod.dir / "in-cluster-kubeconfig.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "in-cluster",
        "clusters": [{"name": "in-cluster", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "pod", "user": {"tokenFile": token}}],
        "contexts": [{"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "pod"}}],
    }))
    return path


def _gzip_yaml_adapter(adapt: Any) -> Adapter:
    def adapter(name: str, content: bytes) -> bytes:
        if not name.endswith(".gz"):
            return content
        text = gzip.decompress(content).decode()
        return gzip.compress(adapt(text).encode(), mtime=0)

    return adapter


# ---- small HTTP clients ----------------------------------------------------------------------------


def _get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - local pod address
        return json.loads(response.read().decode() or "null")


@dataclass
class PrometheusAPI:
    """Prometheus' HTTP API at `url`."""

    url: str

    def api(self, path: str, **params: str) -> Any:
        payload = _get_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        if payload.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} failed: {payload}")
        return payload["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = str(at)
        result: list[dict[str, Any]] = self.api("query", **params)["result"]
        return result

    def targets(self, pool: str | None = None) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return [t for t in active if pool is None or t["scrapePool"] == pool]

    def targets_up(self, pool: str | None = None) -> bool:
        active = self.targets(pool)
        return bool(active) and all(target["health"] == "up" for target in active)

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def rule_health(self) -> list[dict[str, Any]]:
        """Every rule with its health and last error, as Prometheus reports them."""
        return [rule for group in self.rule_groups() for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts


@dataclass
class AlertmanagerAPI:
    url: str

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = _get_json(f"{self.url}/api/v2/alerts?{urllib.parse.urlencode(filters)}")
        return result

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        request = urllib.request.Request(  # noqa: S310 - local pod address
            f"{self.url}/api/v2/alerts", data=json.dumps(alerts).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass

    def loaded_config(self) -> str:
        """The configuration Alertmanager is running (after its last reload)."""
        return str(_get_json(f"{self.url}/api/v2/status")["config"]["original"])


# ---- the stack -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackSettings:
    """kube-prometheus-stack's defaults, but for the timings (its own defaults in the comments)."""

    namespace: str = "monitoring"
    release: str = "kube-prometheus-stack"
    scrape_interval: str = "1s"  # 30s
    evaluation_interval: str = "1s"  # 30s
    resend_delay: str = "1s"  # Prometheus' 1m: how soon Alertmanager hears of a firing alert again
    group_wait: str = "1s"  # 30s
    group_interval: str = "1s"  # 5m
    repeat_interval: str = "1h"  # 12h
    retention: str = "10d"


def prometheus_resource(name: str, settings: StackSettings, *, retention: str | None = None,
                        alertmanager: str | None = None) -> dict[str, Any]:
    """A Prometheus as kube-prometheus-stack's chart renders it with default values (and the test timings)."""
    version = prometheus_version()
    release = {"matchLabels": {"release": settings.release}}
    spec: dict[str, Any] = {
        "image": f"quay.io/prometheus/prometheus:{version}", "version": version,
        "replicas": 1, "shards": 1, "paused": False, "listenLocal": False, "enableAdminAPI": False,
        "logLevel": "info", "logFormat": "logfmt", "retention": retention or settings.retention,
        "walCompression": True, "routePrefix": "/", "portName": "http-web",
        "externalUrl": f"http://{name}.{settings.namespace}:9090",
        "serviceAccountName": "prometheus",  # the release's own RBAC (example/rbac/prometheus)
        "serviceMonitorSelector": release, "serviceMonitorNamespaceSelector": {},
        "podMonitorSelector": release, "podMonitorNamespaceSelector": {},
        "probeSelector": release, "probeNamespaceSelector": {},
        "ruleSelector": release, "ruleNamespaceSelector": {},
        "scrapeConfigSelector": release, "scrapeConfigNamespaceSelector": {},
        "securityContext": {"fsGroup": 2000, "runAsGroup": 2000, "runAsNonRoot": True, "runAsUser": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "scrapeInterval": settings.scrape_interval, "evaluationInterval": settings.evaluation_interval,
        "additionalArgs": [{"name": "rules.alert.resend-delay", "value": settings.resend_delay}],
    }
    if alertmanager:
        spec["alerting"] = {"alertmanagers": [{"namespace": settings.namespace, "name": alertmanager,
                                               "port": "http-web", "pathPrefix": "/", "apiVersion": "v2"}]}
    return {"apiVersion": f"{MONITORING_API}/v1", "kind": "Prometheus",
            "metadata": {"name": name, "namespace": settings.namespace,
                         "labels": {"app": "kube-prometheus-stack-prometheus", "release": settings.release}},
            "spec": spec}


def alertmanager_resource(name: str, settings: StackSettings) -> dict[str, Any]:
    version = alertmanager_version()
    return {"apiVersion": f"{MONITORING_API}/v1", "kind": "Alertmanager",
            "metadata": {"name": name, "namespace": settings.namespace,
                         "labels": {"app": "kube-prometheus-stack-alertmanager", "release": settings.release}},
            "spec": {
                "image": f"quay.io/prometheus/alertmanager:{version}", "version": version, "replicas": 1,
                "listenLocal": False, "serviceAccountName": name, "automountServiceAccountToken": True,
                "externalUrl": f"http://{name}.{settings.namespace}:9093", "paused": False,
                "logFormat": "logfmt", "logLevel": "info", "retention": "120h",
                "alertmanagerConfigSelector": {}, "alertmanagerConfigNamespaceSelector": {},
                "routePrefix": "/", "portName": "http-web",
                "securityContext": {"fsGroup": 2000, "runAsGroup": 2000, "runAsNonRoot": True, "runAsUser": 1000,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
            }}


def alertmanager_base_config(settings: StackSettings) -> dict[str, Any]:
    """kube-prometheus-stack's `alertmanager.config` default (the timings excepted)."""
    return {
        "global": {"resolve_timeout": "5m"},
        "inhibit_rules": [
            {"source_matchers": ["severity = critical"], "target_matchers": ["severity =~ warning|info"],
             "equal": ["namespace", "alertname"]},
            {"source_matchers": ["severity = warning"], "target_matchers": ["severity = info"],
             "equal": ["namespace", "alertname"]},
            {"source_matchers": ["alertname = InfoInhibitor"], "target_matchers": ["severity = info"],
             "equal": ["namespace"]},
            {"target_matchers": ["alertname = InfoInhibitor"]},
        ],
        "route": {"group_by": ["namespace"], "group_wait": settings.group_wait,
                  "group_interval": settings.group_interval, "repeat_interval": settings.repeat_interval,
                  "receiver": "null", "routes": [{"receiver": "null", "matchers": ['alertname = "Watchdog"']}]},
        "receivers": [{"name": "null"}],
        "templates": ["/etc/alertmanager/config/*.tmpl"],
    }


def _service(name: str, namespace: str, port: int, selector: dict[str, str], release: str, app: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app": app, "release": release, "self-monitor": "true"}},
            "spec": {"type": "ClusterIP", "selector": selector,
                     "ports": [{"name": "http-web", "port": port, "targetPort": port, "protocol": "TCP"},
                               {"name": "reloader-web", "port": 8080, "targetPort": "reloader-web",
                                "protocol": "TCP"}]}}


class PrometheusStack:
    """kube-prometheus-stack's monitoring on this cluster: Prometheus Operator + Prometheus + Alertmanager."""

    def __init__(self, cluster: ClusterBase, workdir: Path, *, settings: StackSettings | None = None,
                 operator: PrometheusOperator | None = None, remove_on_stop: bool = True) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.settings = settings or StackSettings()
        self.namespace = self.settings.namespace
        self.prometheus_name = f"{self.settings.release}-prometheus"
        self.alertmanager_name = f"{self.settings.release}-alertmanager"
        self.operator = operator
        self._own_operator = operator is None
        # Uninstall on stop (as `helm uninstall` would): other tests on the same cluster then see no
        # Prometheus resource of ours (the operator picks labels from the Prometheus resources it finds).
        self.remove_on_stop = remove_on_stop
        self._applied: list[dict[str, Any]] = []
        self.kubelet = LocalKubelet(cluster, workdir / "pods")
        self.prometheus_pod: LocalPod | None = None
        self.alertmanager_pod: LocalPod | None = None
        self.timings: dict[str, float] = {}

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> PrometheusStack:
        started = time.monotonic()
        try:
            if self.operator is None:
                self.operator = PrometheusOperator(self.cluster, self.workdir / "prometheus-operator",
                                                   namespace=self.namespace).start()
            self.timings["prometheus operator"] = time.monotonic() - started
            self._apply_resources()
            self.alertmanager_pod = self.run_pod("alertmanager", self.alertmanager_name, timeout=timeout)
            self.prometheus_pod = self.run_pod("prometheus", self.prometheus_name, timeout=timeout)
            self.timings["stack"] = time.monotonic() - started
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.kubelet.stop()
        if self.remove_on_stop and self._applied:
            self.remove()
        if self._own_operator and self.operator is not None:
            self.operator.stop()

    def remove(self, timeout: float = 90) -> None:
        """Delete what `start` applied and wait until the generated pods are gone."""
        refs = [f"{o['kind'].lower()}/{o['metadata']['name']}" for o in reversed(self._applied)]
        self.cluster.kubectl("delete", "-n", self.namespace, "--ignore-not-found", "--wait=true",
                             f"--timeout={int(timeout)}s", *refs, check=False)
        self._applied = []
        selector = (f"app.kubernetes.io/managed-by=prometheus-operator,"
                    f"app.kubernetes.io/instance in ({self.prometheus_name},{self.alertmanager_name})")

        def gone() -> bool:
            left = self.cluster.kubectl("get", "pods", "-n", self.namespace, "-l", selector, "-o", "name", check=False)
            return left.returncode == 0 and not left.stdout.strip()

        with contextlib.suppress(TimeoutError):
            wait_for("the generated pods to be gone", gone, timeout=timeout)

    @contextlib.contextmanager
    def running(self) -> Iterator[PrometheusStack]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _apply_resources(self) -> None:
        s = self.settings
        base = alertmanager_base_config(s)
        items: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": self.alertmanager_name, "namespace": self.namespace}},
            {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": f"alertmanager-{self.alertmanager_name}", "namespace": self.namespace},
             "stringData": {"alertmanager.yaml": yaml.safe_dump(base, sort_keys=False)}},
            _service(self.prometheus_name, self.namespace, 9090,
                     {"app.kubernetes.io/name": "prometheus", "operator.prometheus.io/name": self.prometheus_name},
                     s.release, "kube-prometheus-stack-prometheus"),
            _service(self.alertmanager_name, self.namespace, 9093,
                     {"app.kubernetes.io/name": "alertmanager", "alertmanager": self.alertmanager_name},
                     s.release, "kube-prometheus-stack-alertmanager"),
            alertmanager_resource(self.alertmanager_name, s),
            prometheus_resource(self.prometheus_name, s, alertmanager=self.alertmanager_name),
        ]
        self._applied = items
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                             input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def run_pod(self, kind: str, name: str, *, namespace: str | None = None, seed: Mapping[str, Path] | None = None,
                timeout: float = 180) -> LocalPod:
        """Run the pod the Prometheus Operator generated for the Prometheus or Alertmanager `name`."""
        namespace = namespace or self.namespace
        selector = f"prometheus={name}" if kind == "prometheus" else f"alertmanager={name}"
        pod = self.kubelet.running_pod(namespace, selector, timeout=timeout)
        server = self.cluster.server

        def adapters(local: LocalPod) -> dict[str, Adapter]:
            chosen: dict[str, Adapter] = {}
            for volume in local.pod["spec"].get("volumes") or []:
                secret = (volume.get("secret") or {}).get("secretName")
                if kind == "prometheus" and secret == f"prometheus-{name}":
                    def adapt(text: str, local: LocalPod = local) -> str:
                        kubeconfig = _in_cluster_kubeconfig(local, "prometheus", server)
                        config = adapt_prometheus_config(yaml.safe_load(text), pod=local, kubeconfig=kubeconfig)
                        return "# Adapted by slm_devtools.promstack.adapt_prometheus_config\n" + yaml.safe_dump(
                            config, sort_keys=False)
                    chosen[volume["name"]] = _gzip_yaml_adapter(adapt)
                if kind == "alertmanager" and secret == f"alertmanager-{name}-generated":
                    chosen[volume["name"]] = _gzip_yaml_adapter(
                        lambda text, local=local: adapt_alertmanager_config(text, pod=local))
            return chosen

        local = self.kubelet.run(pod, adapters=adapters, seed=seed, timeout=timeout)
        wait_reloader_watching(local, timeout=timeout)
        return local

    # --- what tests use -------------------------------------------------------------------------
    @property
    def prometheus(self) -> PrometheusAPI:
        assert self.prometheus_pod is not None, "the stack is not started"
        return PrometheusAPI(self.prometheus_pod.url("http-web"))

    @property
    def alertmanager(self) -> AlertmanagerAPI:
        assert self.alertmanager_pod is not None, "the stack is not started"
        return AlertmanagerAPI(self.alertmanager_pod.url("http-web"))

    def _secret_gz(self, name: str, key: str) -> str:
        data = self.cluster.kubectl_json("get", "secret", name, "-n", self.namespace)["data"][key]
        return gzip.decompress(base64.b64decode(data)).decode()

    def generated_prometheus_config(self) -> dict[str, Any]:
        """prometheus.yaml exactly as the Prometheus Operator wrote it (before adapt_prometheus_config)."""
        config: dict[str, Any] = yaml.safe_load(self._secret_gz(f"prometheus-{self.prometheus_name}",
                                                                "prometheus.yaml.gz"))
        return config

    def generated_alertmanager_config(self) -> str:
        """alertmanager.yaml as the Prometheus Operator generated it (the base and every AlertmanagerConfig)."""
        return self._secret_gz(f"alertmanager-{self.alertmanager_name}-generated", "alertmanager.yaml.gz")

    def prometheus_resource(self) -> dict[str, Any]:
        result: dict[str, Any] = self.cluster.kubectl_json("get", "prometheus", self.prometheus_name,
                                                           "-n", self.namespace)
        return result

    # --- waiting for an object to be consumed, with the reason when it is not ---------------------
    def wait_target_up(self, namespace: str, name: str, *, timeout: float = 60,
                       endpoint: int = 0) -> list[dict[str, Any]]:
        """The ServiceMonitor's targets, once all are up; else NotConsumed saying why."""
        pool = f"serviceMonitor/{namespace}/{name}/{endpoint}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                targets = self.prometheus.targets(pool)
                if targets and all(t["health"] == "up" for t in targets):
                    return targets
            time.sleep(0.25)
        raise NotConsumed(f"ServiceMonitor {namespace}/{name}: no target up in Prometheus "
                          f"{self.namespace}/{self.prometheus_name} within {timeout:.0f}s: "
                          + "; ".join(self.explain_service_monitor(namespace, name)))

    def wait_rules_loaded(self, namespace: str, name: str, *, timeout: float = 60) -> list[dict[str, Any]]:
        """The rule groups Prometheus loaded from the PrometheusRule; else NotConsumed saying why."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, KubectlError):
                groups = self.loaded_rule_groups(namespace, name)
                if groups:
                    return groups
            time.sleep(0.25)
        raise NotConsumed(f"PrometheusRule {namespace}/{name}: not loaded by Prometheus "
                          f"{self.namespace}/{self.prometheus_name} within {timeout:.0f}s: "
                          + "; ".join(self.explain_prometheus_rule(namespace, name)))

    def loaded_rule_groups(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Rule groups Prometheus evaluates from this PrometheusRule (its file is `<ns>-<name>-<uid>.yaml`)."""
        uid = self.cluster.kubectl_json("get", "prometheusrule", name, "-n", namespace)["metadata"]["uid"]
        suffix = f"/{namespace}-{name}-{uid}.yaml"
        return [g for g in self.prometheus.rule_groups() if g["file"].endswith(suffix)]

    def wait_alertmanager_config(self, namespace: str, name: str, *, timeout: float = 60) -> str:
        """Alertmanager's running configuration once it routes for the AlertmanagerConfig; else NotConsumed."""
        marker = f"{namespace}/{name}/"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                loaded = self.alertmanager.loaded_config()
                if marker in loaded:
                    return loaded
            time.sleep(0.25)
        raise NotConsumed(f"AlertmanagerConfig {namespace}/{name}: not in Alertmanager "
                          f"{self.namespace}/{self.alertmanager_name}'s configuration within {timeout:.0f}s: "
                          + "; ".join(self.explain_alertmanager_config(namespace, name)))

    # --- diagnosis ------------------------------------------------------------------------------
    def rejections(self, kind: str, namespace: str, name: str) -> list[str]:
        """The Prometheus Operator's `InvalidConfiguration` warnings about an object (its Events)."""
        events = self.cluster.kubectl_json(
            "get", "events", "-n", namespace,
            "--field-selector", f"involvedObject.kind={kind},involvedObject.name={name},reason=InvalidConfiguration")
        return [str(e.get("message") or e.get("note") or "") for e in events.get("items", [])]

    def _selected(self, kind: str, namespace: str, name: str, selector_field: str, namespace_field: str,
                  owner: dict[str, Any]) -> list[str]:
        problems = []
        owner_ref = f"{owner['kind']} {owner['metadata']['namespace']}/{owner['metadata']['name']}"
        obj = self.cluster.kubectl_json("get", kind.lower(), name, "-n", namespace)
        labels = obj["metadata"].get("labels") or {}
        selector = owner["spec"].get(selector_field)
        if selector is None:
            problems.append(f"{owner_ref} has no {selector_field} (selects nothing)")
        else:
            chosen = self.cluster.kubectl("get", kind.lower(), "-n", namespace, "-l", selector_string(selector),
                                          "-o", "name").stdout.split()
            if not any(c.endswith(f"/{name}") for c in chosen):
                problems.append(f"{owner_ref} does not select it: its {selector_field} {json.dumps(selector)} "
                                f"does not match the {kind}'s labels {json.dumps(labels)}")
        namespace_selector = owner["spec"].get(namespace_field)
        if namespace_selector is None:
            if namespace != owner["metadata"]["namespace"]:
                problems.append(f"{owner_ref} has no {namespace_field}: it only looks in its own namespace")
        elif namespace_selector:
            names = self.cluster.kubectl("get", "namespaces", "-l", selector_string(namespace_selector),
                                         "-o", "name").stdout.split()
            if f"namespace/{namespace}" not in names:
                problems.append(f"{owner_ref}'s {namespace_field} {json.dumps(namespace_selector)} "
                                f"does not select namespace {namespace}")
        return problems

    def explain_service_monitor(self, namespace: str, name: str) -> list[str]:
        try:
            monitor = self.cluster.kubectl_json("get", "servicemonitor", name, "-n", namespace)
        except KubectlError:
            return [f"the ServiceMonitor {namespace}/{name} does not exist"]
        problems = self._selected("ServiceMonitor", namespace, name, "serviceMonitorSelector",
                                  "serviceMonitorNamespaceSelector", self.prometheus_resource())
        problems += [f"rejected by the Prometheus Operator: {m}" for m in self.rejections("ServiceMonitor", namespace,
                                                                                             name)]
        for binding in (monitor.get("status") or {}).get("bindings") or []:
            for condition in binding.get("conditions") or []:
                if condition.get("type") == "Accepted" and condition.get("status") != "True":
                    problems.append(f"not accepted by {binding.get('resource')} {binding.get('namespace')}/"
                                    f"{binding.get('name')}: {condition.get('reason')}: {condition.get('message')}")
        spec = monitor["spec"]
        scope = spec.get("namespaceSelector") or {}
        namespaces = ["--all-namespaces"] if scope.get("any") else None
        searched = scope.get("matchNames") or [namespace]
        services: list[dict[str, Any]] = []
        try:
            if namespaces:
                services = self.cluster.kubectl_json("get", "services", "--all-namespaces", "-l",
                                                     selector_string(spec.get("selector") or {}))["items"]
            else:
                for ns in searched:
                    services += self.cluster.kubectl_json("get", "services", "-n", ns, "-l",
                                                          selector_string(spec.get("selector") or {}))["items"]
        except (KubectlError, ValueError) as error:
            problems.append(f"its selector cannot be read: {error}")
        if not services:
            problems.append(f"its selector {json.dumps(spec.get('selector'))} matches no Service in "
                            f"{'any namespace' if namespaces else searched}")
        for index, endpoint in enumerate(spec.get("endpoints") or []):
            port = endpoint.get("port")
            for service in services:
                ports = [p.get("name") for p in service["spec"].get("ports") or []]
                if port and port not in ports:
                    problems.append(f"endpoints[{index}].port {port!r} is not a port name of Service "
                                    f"{service['metadata']['namespace']}/{service['metadata']['name']} "
                                    f"(its ports: {ports})")
        for service in services:
            ref = f"{service['metadata']['namespace']}/{service['metadata']['name']}"
            slices = self.cluster.kubectl_json("get", "endpointslices", "-n", service["metadata"]["namespace"], "-l",
                                               f"kubernetes.io/service-name={service['metadata']['name']}")["items"]
            ready = [e for s in slices for e in s.get("endpoints") or []
                     if (e.get("conditions") or {}).get("ready") is not False]
            if not ready:
                problems.append(f"Service {ref} has no ready endpoints (no Running pod matches its selector "
                                f"{json.dumps(service['spec'].get('selector'))})")
        pool = f"serviceMonitor/{namespace}/{name}/0"
        with contextlib.suppress(Exception):
            generated = f"job_name: {pool}" in yaml.safe_dump(self.generated_prometheus_config())
            running = f"job_name: {pool}" in self.prometheus.api("status/config")["yaml"]
            if generated and not running:
                problems.append(
                    f"the Prometheus Operator generated the scrape job {pool}, but Prometheus has not loaded it yet: "
                    "its config reloader sees only the first change of the configuration file after it starts "
                    "(the kubelet replaces the file, and the watch on it ends; prometheus-operator#7366), later "
                    "ones at its 3-minute check")
            elif not generated and not problems:
                problems.append(f"the Prometheus Operator generated no scrape job {pool}")
            for target in self.prometheus.targets(pool):
                if target["health"] != "up":
                    problems.append(f"target {target['labels'].get('instance')} is {target['health']}: "
                                    f"{target.get('lastError')}")
        return problems or ["nothing wrong found in the objects; see the Prometheus Operator's log: "
                            + (self.operator.log_tail(10) if self.operator else "")]

    def explain_prometheus_rule(self, namespace: str, name: str) -> list[str]:
        try:
            self.cluster.kubectl_json("get", "prometheusrule", name, "-n", namespace)
        except KubectlError:
            return [f"the PrometheusRule {namespace}/{name} does not exist"]
        problems = self._selected("PrometheusRule", namespace, name, "ruleSelector", "ruleNamespaceSelector",
                                  self.prometheus_resource())
        problems += [f"rejected by the Prometheus Operator: {m}" for m in self.rejections("PrometheusRule", namespace,
                                                                                             name)]
        if self.operator is not None and problems:
            problems += [f"the Prometheus Operator's log: {e}" for e in self.operator.errors_about(namespace, name)]
        with contextlib.suppress(Exception):
            for group in self.loaded_rule_groups(namespace, name):
                problems += [f"rule {r.get('name')} in group {group['name']}: {r.get('lastError')}"
                             for r in group["rules"] if r.get("health") == "err"]
        return problems or ["nothing wrong found in the objects; see the Prometheus Operator's log: "
                            + (self.operator.log_tail(10) if self.operator else "")]

    def explain_alertmanager_config(self, namespace: str, name: str) -> list[str]:
        try:
            self.cluster.kubectl_json("get", "alertmanagerconfig", name, "-n", namespace)
        except KubectlError:
            return [f"the AlertmanagerConfig {namespace}/{name} does not exist"]
        owner = self.cluster.kubectl_json("get", "alertmanager", self.alertmanager_name, "-n", self.namespace)
        problems = self._selected("AlertmanagerConfig", namespace, name, "alertmanagerConfigSelector",
                                  "alertmanagerConfigNamespaceSelector", owner)
        problems += [f"rejected by the Prometheus Operator: {m}" for m in self.rejections("AlertmanagerConfig",
                                                                                             namespace, name)]
        if self.operator is not None and problems:
            problems += [f"the Prometheus Operator's log: {e}" for e in self.operator.errors_about(namespace, name)]
        return problems or ["nothing wrong found in the objects; see the Prometheus Operator's log: "
                            + (self.operator.log_tail(10) if self.operator else "")]


def wait_reloader_watching(pod: LocalPod, *, timeout: float = 60) -> None:
    """Until the pod's config reloader has reloaded once and watches its files.

    Its first reload may race the server's start (then it retries 5 s later); a file changed before it
    watches is only seen at its next periodic check, 3 minutes later — in a cluster too. Tests change
    objects right after start, so start waits for this.
    """
    url = pod.url(pod.port("reloader-web", "config-reloader"), "/metrics")

    def watching() -> bool:
        pod.check()
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - local pod address
            values = {line.split()[0]: float(line.split()[1]) for line in response.read().decode().splitlines()
                      if line and not line.startswith("#") and len(line.split()) == 2}
        return values.get("reloader_last_reload_successful") == 1 and values.get("reloader_watches", 0) >= 1

    wait_for(f"the config reloader of {pod!r} to reload and watch", watching, timeout=timeout,
             on_timeout=lambda: pod.logs("config-reloader")[-2000:])


def running_prometheus(stack: PrometheusStack, name: str, *, namespace: str, retention: str,
                       seed: Path | None = None, timeout: float = 180) -> tuple[LocalPod, PrometheusAPI]:
    """Another Prometheus resource (no Alertmanager), its pod run here with `seed` as its TSDB to start from."""
    resource = prometheus_resource(name, stack.settings, retention=retention)
    resource["metadata"]["namespace"] = namespace
    stack.cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(resource))
    seeds = {f"prometheus-{name}-db": seed} if seed else None
    pod = stack.run_pod("prometheus", name, namespace=namespace, seed=seeds, timeout=timeout)
    return pod, PrometheusAPI(pod.url("http-web"))


def statefulset_args(pod: LocalPod, container: str) -> Sequence[str]:
    """The args the Prometheus Operator gave a container (for tests of what it generated)."""
    spec = next(c for c in pod.pod["spec"]["containers"] if c["name"] == container)
    return list(spec.get("args") or [])


__all__ = [
    "AlertmanagerAPI", "NotConsumed", "PrometheusAPI", "PrometheusOperator", "PrometheusStack", "StackSettings",
    "adapt_alertmanager_config", "adapt_prometheus_config", "running_prometheus",
]
