"""Pure renderers: an SLMDeployment's typed spec in, the list of child objects (plain dicts) out.

`desired_children` is the one pipeline: the reconcile applies what it returns and the golden tests pin
it. Kubernetes kinds come from Jinja2 templates (templates/<kind>.yaml.j2, one kind per file, every
value through `tojson` so no user string can break the YAML). The PrometheusRule, the dashboard
ConfigMap and the AlertmanagerConfig wrap what slm_operator.monitoring renders (rule groups, Grafana
JSON, routing): that content is data built in Python, never text-templated.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import jinja2
import yaml
from kubernetes.utils import parse_quantity

from slm_operator import runtimes, sidecar
from slm_operator.monitoring import dashboards, notifications, rules
from slm_operator.spec import BUILTIN, DATA_DIR, SERVER_PORT, Parent, SecretKeyRef, SLMDeploymentSpec, child_names
from slm_operator.status import Problem

COMPONENT_SERVER = "inference-server"
COMPONENT_MONITORING = "monitoring"
GPU_RESOURCE = "nvidia.com/gpu"
EPHEMERAL_STORAGE = "ephemeral-storage"
# DATA_DIR (spec): the model volume; also the default mountpoint of SLMLowDiskSpace.
# The key of the llama.cpp image for pods with GPUs in RenderContext.runtime_images (CPU and CUDA builds differ).
LLAMACPP_GPU = "llamacpp-gpu"
SHM_DIR = "/dev/shm"  # noqa: S108 - a mount point in the pod, not a file this process writes
# Labels every Prometheus Operator-managed Prometheus pod carries (prometheus-operator's statefulset.go).
PROMETHEUS_POD_LABELS = {"app.kubernetes.io/name": "prometheus"}
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace

# Kinds the serving needs; the others are monitoring (they never hold up serving).
SERVING_KINDS = ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy")
MONITORING_CONTENT_KINDS = ("ServiceMonitor", "PrometheusRule", "ConfigMap", "AlertmanagerConfig")


@dataclasses.dataclass(frozen=True)
class MonitorLabels:
    """Labels the Prometheus resources select monitors by (from the spec, else detected)."""

    service_monitor: Mapping[str, str] = dataclasses.field(default_factory=dict)
    rule: Mapping[str, str] = dataclasses.field(default_factory=dict)


def default_runtime_images() -> dict[str, str]:
    """The pinned upstream image of each third-party runtime (slm_operator.runtimes.PINS), by runtime."""
    images = {name: pin.image for name, pin in runtimes.PINS.items()}
    images[LLAMACPP_GPU] = runtimes.PINS["llamacpp"].gpu_image or runtimes.PINS["llamacpp"].image
    return images


@dataclasses.dataclass(frozen=True)
class RenderContext:
    """What the operator's settings and the cluster add to a spec when rendering it.

    server_image: the serving image of runtime builtin when spec.image is empty.
    runtime_images: the serving image of each third-party runtime when spec.image is empty (keys: the
        runtimes, and `llamacpp-gpu` for llama.cpp in pods with GPUs); chart values operator.runtimeImages.
    sidecar_image: the monitoring sidecar's image in the pods of third-party runtimes (operator.sidecarImage).
    monitor_labels: labels for the ServiceMonitor and PrometheusRule; None takes the spec's own.
    prometheus_namespaces: where the cluster's Prometheus resources run (the NetworkPolicy lets them scrape).
    allow_fault_injection / allow_full_output_logging: the operator-level gates (chart values
        operator.allowFaultInjection / operator.allowFullOutputLogging); off, the spec cannot switch those on.
    """

    server_image: str
    runtime_images: Mapping[str, str] = dataclasses.field(default_factory=default_runtime_images)
    sidecar_image: str = sidecar.DEFAULT_SIDECAR_IMAGE
    monitor_labels: MonitorLabels | None = None
    prometheus_namespaces: tuple[str, ...] = ()
    allow_fault_injection: bool = False
    allow_full_output_logging: bool = False


# A renderer of monitoring content failed: (kind, exception). Serving must not wait on such a bug.
OnRenderError = Callable[[str, Exception], None]


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("slm_operator", "templates"),
        undefined=jinja2.StrictUndefined,  # a missing variable is a bug, not an empty string
        autoescape=False,  # noqa: S701 - YAML, not HTML; every value is escaped by `tojson`
        keep_trailing_newline=True,
    )


def _from_template(template: str, **context: Any) -> dict[str, Any]:
    text = _environment().get_template(template).render(**context)
    obj = yaml.safe_load(text)
    assert isinstance(obj, dict), template
    return obj


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _metadata_context(parent: Parent, kind: str, component: str, extra_labels: Mapping[str, str] | None = None,
                      annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    labels = {**(extra_labels or {}), **parent.labels(component)}
    return {
        "child_name": child_names(parent.name)[kind],
        "namespace": parent.namespace,
        "labels": labels,
        "annotations": dict(annotations or {}),
        "owner_references": [parent.owner_reference()],
    }


def _metadata(parent: Parent, kind: str, component: str, extra_labels: Mapping[str, str] | None = None,
              annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    ctx = _metadata_context(parent, kind, component, extra_labels, annotations)
    meta: dict[str, Any] = {
        "name": ctx["child_name"],
        "namespace": ctx["namespace"],
        "labels": ctx["labels"],
        "ownerReferences": ctx["owner_references"],
    }
    if ctx["annotations"]:
        meta["annotations"] = ctx["annotations"]
    return meta


# --- the operator-level gates -------------------------------------------------------------------------

def faults_enabled(spec: SLMDeploymentSpec, context: RenderContext) -> bool:
    return spec.server.faults_admin and context.allow_fault_injection


def output_policy(spec: SLMDeploymentSpec, context: RenderContext) -> str:
    """What the server is told to log of each output: `full` only where the operator allows it."""
    if spec.logging.outputs == "full" and not context.allow_full_output_logging:
        return "hash"
    return spec.logging.outputs


def policy_problems(spec: SLMDeploymentSpec, context: RenderContext) -> list[Problem]:
    """Settings of the spec the operator does not honour, and why (a condition and a Warning Event say so)."""
    problems = []
    if spec.server.faults_admin and not context.allow_fault_injection:
        problems.append(Problem(
            "FaultInjectionNotAllowed",
            "spec.server.faultsAdmin is true but this operator does not allow fault injection (chart value "
            "operator.allowFaultInjection, SLM_OPERATOR_ALLOW_FAULT_INJECTION): the server runs without it",
        ))
    if spec.logging.outputs == "full" and not context.allow_full_output_logging:
        problems.append(Problem(
            "FullOutputLoggingNotAllowed",
            "spec.logging.outputs is full but this operator does not allow logging outputs in full (chart value "
            "operator.allowFullOutputLogging, SLM_OPERATOR_ALLOW_FULL_OUTPUT_LOGGING): outputs are logged as hash",
        ))
    return problems


def serving_secret_refs(spec: SLMDeploymentSpec, context: RenderContext) -> list[tuple[str, SecretKeyRef]]:
    """(field path, reference) of every Secret the serving pods read (their containers wait for it)."""
    refs: list[tuple[str, SecretKeyRef]] = []
    if output_policy(spec, context) == "hash" and spec.logging.output_hash_key_secret_ref is not None:
        refs.append(("spec.logging.outputHashKeySecretRef", spec.logging.output_hash_key_secret_ref))
    if faults_enabled(spec, context) and spec.server.admin_token_secret_ref is not None:
        refs.append(("spec.server.adminTokenSecretRef", spec.server.admin_token_secret_ref))
    if spec.model.hf_token_secret_ref is not None:
        refs.append(("spec.model.hfTokenSecretRef", spec.model.hf_token_secret_ref))
    return refs


def unsupported_alerts(spec: SLMDeploymentSpec) -> Problem | None:
    """The alerts left out of the PrometheusRule because the runtime lacks the series they read, and why.

    Alerts the spec disables are not counted (listing them in alerts.disabled acknowledges the gap).
    """
    if not spec.monitoring.enabled:
        return None
    disabled = set(spec.monitoring.alerts.disabled)
    lacking = {alert: why for alert, why in rules.unrendered_alerts(spec.runtime).items() if alert not in disabled}
    if not lacking:
        return None
    reasons = "; ".join(
        f"{alert}: {', '.join(dict.fromkeys(item['reason'] for item in why))}" for alert, why in lacking.items())
    return Problem(
        "RuntimeLacksSignals",
        f"{len(lacking)} alert(s) not rendered for runtime {spec.runtime}, which lacks the series they read: {reasons} "
        "(list them in spec.monitoring.alerts.disabled to acknowledge)",
    )


# --- the serving pods ---------------------------------------------------------------------------------

def server_env(spec: SLMDeploymentSpec, context: RenderContext) -> list[dict[str, Any]]:
    """The SLM_* settings of the server (shared contract), in a fixed order; secrets by reference."""
    has_pvc = spec.model.source is not None
    server = spec.server
    values: list[tuple[str, Any]] = [
        ("SLM_MODEL", DATA_DIR if has_pvc else spec.model.name),
        ("SLM_MODEL_REVISION", spec.model.revision),
        ("SLM_MODEL_NAME", spec.model.served),
        ("SLM_DTYPE", spec.model.dtype),
        ("SLM_HOST", "0.0.0.0"),  # noqa: S104 - a pod listens on its own IP
        ("SLM_PORT", SERVER_PORT),
        ("SLM_MAX_NEW_TOKENS", server.max_new_tokens),
        ("SLM_MAX_CONCURRENT_REQUESTS", server.max_concurrent_requests),
        ("SLM_MAX_BATCH_SIZE", server.max_batch_size),
        ("SLM_PREFILL_CHUNK_TOKENS", server.prefill_chunk_tokens),
        ("SLM_PREFIX_CACHE_MIB", server.prefix_cache_mib),
        ("SLM_MAX_QUEUE", server.max_queue),
        ("SLM_REQUEST_TIMEOUT_SECONDS", server.request_timeout_seconds),
        ("SLM_LOG_LEVEL", spec.logging.level),
        ("SLM_LOG_OUTPUTS", output_policy(spec, context)),
        ("SLM_LOG_SAMPLE_RATE", float(spec.logging.sample_rate)),
        ("SLM_DISK_PATHS", DATA_DIR),
    ]
    if faults_enabled(spec, context):
        values.append(("SLM_FAULTS_ADMIN", True))
    # The root filesystem is read-only: the hub cache lives on a writable volume.
    values.append(("HF_HOME", "/tmp/huggingface" if has_pvc else f"{DATA_DIR}/huggingface"))  # noqa: S108
    if has_pvc:
        values.append(("HF_HUB_OFFLINE", "1"))  # weights come from the claim; never reach the hub
    env: list[dict[str, Any]] = [{"name": key, "value": _env_value(value)} for key, value in values]
    secret_env = {"spec.logging.outputHashKeySecretRef": "SLM_OUTPUT_HASH_KEY",
                  "spec.server.adminTokenSecretRef": "SLM_ADMIN_TOKEN",
                  "spec.model.hfTokenSecretRef": runtimes.HF_TOKEN_ENV}
    for path, ref in serving_secret_refs(spec, context):
        env.append(_secret_env(secret_env[path], ref))
    return env


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _bytes(quantity: str | int) -> Decimal:
    return Decimal(parse_quantity(quantity))


def _format_bytes(value: Decimal) -> str:
    for suffix, unit in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if value % unit == 0:
            return f"{int(value // unit)}{suffix}"
    return str(int(value))


def _resources(spec: SLMDeploymentSpec) -> dict[str, Any]:
    requests: dict[str, Any] = dict(spec.resources.requests or {})
    limits: dict[str, Any] = dict(spec.resources.limits or {})
    if EPHEMERAL_STORAGE not in requests:
        # Scheduled where the emptyDirs fit: /tmp, plus the hub download when the weights are not on a claim.
        scratch = _bytes(spec.resources.tmp_size_limit)
        if spec.model.source is None:
            scratch += _bytes(spec.resources.model_cache_size_limit)
        requests[EPHEMERAL_STORAGE] = _format_bytes(scratch)
    if spec.resources.gpus > 0:
        # Extended resources need only the limit; Kubernetes copies it to the request.
        limits[GPU_RESOURCE] = str(spec.resources.gpus)
    resources: dict[str, Any] = {"requests": requests}
    if limits:
        resources["limits"] = limits
    return resources


def _tolerations(spec: SLMDeploymentSpec) -> list[dict[str, Any]]:
    tolerations = [t.wire() for t in spec.tolerations or []]
    if spec.resources.gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule (GKE, EKS, NVIDIA operator).
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _volumes(spec: SLMDeploymentSpec, *, shm: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # sizeLimit: a pod filling its emptyDir past it is evicted, before it fills the node's disk.
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": spec.resources.tmp_size_limit}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108
    source = spec.model.source
    if source is not None:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": source.pvc.claim_name,
                                                                   "readOnly": True}})
        mount: dict[str, Any] = {"name": "model", "mountPath": DATA_DIR, "readOnly": True}
        if source.pvc.sub_path:
            mount["subPath"] = source.pvc.sub_path
        mounts.append(mount)
    else:
        volumes.append({"name": "model", "emptyDir": {"sizeLimit": spec.resources.model_cache_size_limit}})
        mounts.append({"name": "model", "mountPath": DATA_DIR})
    if shm:
        # Memory-backed: the workers of vLLM, SGLang and TGI exchange tensors through /dev/shm (NCCL too), and
        # a container runtime's default /dev/shm is 64 MiB.
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size_limit}})
        mounts.append({"name": "shm", "mountPath": SHM_DIR})
    return volumes, mounts


_RESTRICTED_CONTAINER: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _startup_failure_threshold(spec: SLMDeploymentSpec) -> int:
    return max(1, -(-spec.server.startup_timeout_seconds // 10))  # probe period is 10 s


def runtime_container(spec: SLMDeploymentSpec, context: RenderContext) -> dict[str, Any]:
    """The serving container of a third-party runtime: slm_operator.runtimes' rendering on the runtime port,
    with the pod's image, resources, restricted security, probes, volumes and the HF token by reference."""
    rendered = runtimes.render_runtime(spec.runtime, **spec.runtime_parameters(port=sidecar.RUNTIME_PORT))
    image_key = LLAMACPP_GPU if spec.runtime == "llamacpp" and spec.resources.gpus > 0 else spec.runtime
    image = spec.image or context.runtime_images.get(image_key) or rendered["image"]
    # The runtime's listener is `runtime`, never `http`: `http` is the sidecar's, which the Service targets.
    ports = [{"name": sidecar.RUNTIME_PORT_NAME if name == "http" else name, "containerPort": port, "protocol": "TCP"}
             for name, port in rendered["ports"].items()]
    env: list[dict[str, Any]] = [dict(item) for item in rendered["env"]]
    if spec.model.source is not None:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})  # weights come from the claim; never reach the hub
    if spec.model.hf_token_secret_ref is not None:
        env.append(_secret_env(rendered["hfTokenEnv"], spec.model.hf_token_secret_ref))

    def probe(kind: str, period: int, timeout: int, failures: int) -> dict[str, Any]:
        path = rendered["probes"][kind]["httpGet"]["path"]
        return {"httpGet": {"path": path, "port": sidecar.RUNTIME_PORT_NAME}, "periodSeconds": period,
                "timeoutSeconds": timeout, "failureThreshold": failures}

    _, mounts = _volumes(spec, shm=rendered["needsShm"])
    container: dict[str, Any] = {
        "name": rendered["container"],
        "image": image,
        "command": rendered["command"],
        "args": rendered["args"],
        "ports": ports,
        "env": env,
        "resources": _resources(spec),
        "securityContext": copy.deepcopy(_RESTRICTED_CONTAINER),
        # Model load (minutes for a large model): the health endpoint answers 503 until the weights are in memory.
        "startupProbe": probe("startup", 10, 5, _startup_failure_threshold(spec)),
        "readinessProbe": probe("readiness", 5, 3, 3),
        "livenessProbe": probe("liveness", 10, 5, 3),
        "volumeMounts": mounts,
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def sidecar_container(spec: SLMDeploymentSpec, context: RenderContext) -> dict[str, Any]:
    """The monitoring sidecar in front of a third-party runtime, on the pod's `http` port."""
    hash_key = spec.logging.output_hash_key_secret_ref if output_policy(spec, context) == "hash" else None
    token = spec.server.admin_token_secret_ref if faults_enabled(spec, context) else None
    return sidecar.render_sidecar(
        runtime=spec.runtime,
        served_model_name=spec.model.served,
        model=spec.model.name,
        image=context.sidecar_image,
        image_pull_policy=spec.image_pull_policy,
        runtime_port=sidecar.RUNTIME_PORT,
        request_timeout_seconds=float(spec.server.request_timeout_seconds),
        log_level=spec.logging.level,
        log_outputs=output_policy(spec, context),
        log_sample_rate=spec.logging.sample_rate,
        output_hash_key=hash_key.wire() if hash_key is not None else None,
        faults_admin=faults_enabled(spec, context),
        admin_token=token.wire() if token is not None else None,
    )


def render_deployment(parent: Parent, spec: SLMDeploymentSpec, context: RenderContext) -> dict[str, Any]:
    if spec.runtime != BUILTIN:
        runtime = runtime_container(spec, context)
        volumes, _ = _volumes(spec, shm=any(m["mountPath"] == SHM_DIR for m in runtime["volumeMounts"]))
        containers: list[dict[str, Any]] | None = [runtime, sidecar_container(spec, context)]
        mounts: list[dict[str, Any]] = []
    else:
        volumes, mounts = _volumes(spec)
        containers = None
    return _from_template(
        "deployment.yaml.j2",
        **_metadata_context(parent, "Deployment", COMPONENT_SERVER),
        replicas=spec.replicas,
        selector_labels=parent.selector_labels(),
        pod_labels=parent.labels(COMPONENT_SERVER),
        node_selector=dict(spec.node_selector or {}),
        tolerations=_tolerations(spec),
        image=spec.image or context.server_image,
        image_pull_policy=spec.image_pull_policy,
        env=server_env(spec, context),
        resources=_resources(spec),
        startup_failure_threshold=_startup_failure_threshold(spec),
        volumes=volumes,
        volume_mounts=mounts,
        containers=containers,
    )


def _extra_ports(spec: SLMDeploymentSpec) -> list[dict[str, Any]]:
    """Ports besides `http` that Prometheus scrapes: a third-party runtime's own /metrics."""
    if spec.runtime == BUILTIN:
        return []
    return [{"name": e["port"], "port": e["targetPort"]} for e in sidecar.scrape_endpoints() if e["port"] != "http"]


def render_service(parent: Parent, spec: SLMDeploymentSpec) -> dict[str, Any]:
    return _from_template(
        "service.yaml.j2",
        **_metadata_context(parent, "Service", COMPONENT_SERVER),
        selector_labels=parent.selector_labels(),
        extra_ports=_extra_ports(spec),
    )


def render_pod_disruption_budget(parent: Parent) -> dict[str, Any]:
    return _from_template(
        "poddisruptionbudget.yaml.j2",
        **_metadata_context(parent, "PodDisruptionBudget", COMPONENT_SERVER),
        selector_labels=parent.selector_labels(),
    )


def render_network_policy(parent: Parent, spec: SLMDeploymentSpec, context: RenderContext) -> dict[str, Any]:
    clients = sorted({parent.namespace, *spec.network_policy.allowed_namespaces})
    prometheus: list[dict[str, Any]] = []
    if spec.monitoring.enabled:
        namespaces = sorted(set(spec.network_policy.prometheus_namespaces or context.prometheus_namespaces))
        # No Prometheus resource found (yet): Prometheus pods of any namespace, rather than no scrapes at all.
        namespace_selector: dict[str, Any] = (
            {"matchExpressions": [{"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": namespaces}]}
            if namespaces else {})
        prometheus = [{"namespaceSelector": namespace_selector, "podSelector": {"matchLabels": PROMETHEUS_POD_LABELS}}]
    return _from_template(
        "networkpolicy.yaml.j2",
        **_metadata_context(parent, "NetworkPolicy", COMPONENT_SERVER),
        selector_labels=parent.selector_labels(),
        client_namespaces=clients,
        prometheus_peers=prometheus,
        metrics_ports=["http", *(p["name"] for p in _extra_ports(spec))],
    )


# --- monitoring ---------------------------------------------------------------------------------------

def monitor_labels_of(spec: SLMDeploymentSpec) -> MonitorLabels:
    return MonitorLabels(service_monitor=dict(spec.monitoring.prometheus.service_monitor_labels or {}),
                         rule=dict(spec.monitoring.prometheus.rule_labels or {}))


def render_service_monitor(parent: Parent, spec: SLMDeploymentSpec, labels: MonitorLabels) -> dict[str, Any]:
    return _from_template(
        "servicemonitor.yaml.j2",
        **_metadata_context(parent, "ServiceMonitor", COMPONENT_MONITORING, labels.service_monitor),
        service_selector={**parent.selector_labels(), "app.kubernetes.io/component": COMPONENT_SERVER},
        interval=spec.monitoring.scrape_interval,
        # Builtin: the server on `http`. Others: the sidecar's slm_* series on `http`, the runtime's own on its port.
        endpoints=[{"port": "http", "path": "/metrics"}] if spec.runtime == BUILTIN else [
            {"port": e["port"], "path": e["path"]} for e in sidecar.scrape_endpoints()],
    )


def render_prometheus_rule(parent: Parent, spec: SLMDeploymentSpec, labels: MonitorLabels) -> dict[str, Any]:
    groups = rules.render_rule_groups(name=parent.name, namespace=parent.namespace,
                                      alerts=spec.monitoring.alerts.wire(), runtime=spec.runtime)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(parent, "PrometheusRule", COMPONENT_MONITORING, labels.rule),
        "spec": {"groups": groups},
    }


def render_dashboard_config_map(parent: Parent, spec: SLMDeploymentSpec) -> dict[str, Any]:
    dashboard = dashboards.render_dashboard(
        name=parent.name, namespace=parent.namespace, model=spec.model.served, alerts=spec.monitoring.alerts.wire(),
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            parent, "ConfigMap", "dashboard", spec.monitoring.dashboards.labels,
            # Read by the Grafana sidecar when its folderAnnotation is grafana_folder (kube-prometheus-stack).
            {"grafana_folder": spec.monitoring.dashboards.folder},
        ),
        # Sorted keys: the same dashboard always serialises to the same bytes (no spurious writes).
        "data": {f"{parent.name}.json": json.dumps(dashboard, sort_keys=True, separators=(",", ":"))},
    }


def render_alertmanager_config(parent: Parent, spec: SLMDeploymentSpec, labels: MonitorLabels,
                               ) -> dict[str, Any] | None:
    wanted = spec.monitoring.notifications
    routing = notifications.render_alertmanager_config_spec(
        name=parent.name, namespace=parent.namespace, notifications=wanted.wire() if wanted else None,
    )
    if routing is None:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1alpha1",
        "kind": "AlertmanagerConfig",
        "metadata": _metadata(parent, "AlertmanagerConfig", COMPONENT_MONITORING, labels.rule),
        "spec": routing,
    }


# --- the pipeline -------------------------------------------------------------------------------------

def desired_children(parent: Parent, spec: SLMDeploymentSpec, context: RenderContext, *,
                     on_error: OnRenderError | None = None) -> list[dict[str, Any]]:
    """Every object the SLMDeployment should own right now, serving first, in a fixed order.

    A renderer of monitoring content that raises is reported to `on_error` and its object left out
    (serving never waits on monitoring); without `on_error` the exception propagates.
    """
    children = [
        render_deployment(parent, spec, context),
        render_service(parent, spec),
        render_pod_disruption_budget(parent),
    ]
    if spec.network_policy.enabled:
        children.append(render_network_policy(parent, spec, context))
    if not spec.monitoring.enabled:
        return children
    labels = context.monitor_labels or monitor_labels_of(spec)
    renderers: list[tuple[str, Callable[[], dict[str, Any] | None]]] = [
        ("ServiceMonitor", lambda: render_service_monitor(parent, spec, labels)),
        ("PrometheusRule", lambda: render_prometheus_rule(parent, spec, labels)),
    ]
    if spec.monitoring.dashboards.enabled:
        renderers.append(("ConfigMap", lambda: render_dashboard_config_map(parent, spec)))
    renderers.append(("AlertmanagerConfig", lambda: render_alertmanager_config(parent, spec, labels)))
    for kind, render in renderers:
        try:
            obj = render()
        except Exception as exc:
            if on_error is None:
                raise
            on_error(kind, exc)
            continue
        if obj is not None:
            children.append(obj)
    return children
