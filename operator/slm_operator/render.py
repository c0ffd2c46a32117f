"""Pure renderers: an SLMDeployment's typed spec in, the list of child objects (plain dicts) out.

`desired_children` is the one pipeline: the reconcile applies what it returns and the golden tests pin
it. Kubernetes kinds come from Jinja2 templates (templates/<kind>.yaml.j2, one kind per file, every
value through `tojson` so no user string can break the YAML). The PrometheusRule, the dashboard
ConfigMap and the AlertmanagerConfig wrap what slm_operator.monitoring renders (rule groups, Grafana
JSON, routing): that content is data built in Python, never text-templated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import jinja2
import yaml
from kubernetes.utils import parse_quantity

from slm_operator.monitoring import dashboards, notifications, rules
from slm_operator.spec import SERVER_PORT, Parent, SecretKeyRef, SLMDeploymentSpec, child_names
from slm_operator.status import Problem

COMPONENT_SERVER = "inference-server"
COMPONENT_MONITORING = "monitoring"
GPU_RESOURCE = "nvidia.com/gpu"
EPHEMERAL_STORAGE = "ephemeral-storage"
DATA_DIR = "/data"  # the model volume; also the default mountpoint of SLMLowDiskSpace
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


@dataclasses.dataclass(frozen=True)
class RenderContext:
    """What the operator's settings and the cluster add to a spec when rendering it.

    server_image: the serving image when spec.image is empty.
    monitor_labels: labels for the ServiceMonitor and PrometheusRule; None takes the spec's own.
    prometheus_namespaces: where the cluster's Prometheus resources run (the NetworkPolicy lets them scrape).
    allow_fault_injection / allow_full_output_logging: the operator-level gates (chart values
        operator.allowFaultInjection / operator.allowFullOutputLogging); off, the spec cannot switch those on.
    """

    server_image: str
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
    return refs


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
                  "spec.server.adminTokenSecretRef": "SLM_ADMIN_TOKEN"}
    for path, ref in serving_secret_refs(spec, context):
        env.append({"name": secret_env[path], "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


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


def _volumes(spec: SLMDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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
    return volumes, mounts


def render_deployment(parent: Parent, spec: SLMDeploymentSpec, context: RenderContext) -> dict[str, Any]:
    volumes, mounts = _volumes(spec)
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
        startup_failure_threshold=max(1, -(-spec.server.startup_timeout_seconds // 10)),  # probe period is 10 s
        volumes=volumes,
        volume_mounts=mounts,
    )


def render_service(parent: Parent) -> dict[str, Any]:
    return _from_template(
        "service.yaml.j2",
        **_metadata_context(parent, "Service", COMPONENT_SERVER),
        selector_labels=parent.selector_labels(),
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
    )


def render_prometheus_rule(parent: Parent, spec: SLMDeploymentSpec, labels: MonitorLabels) -> dict[str, Any]:
    groups = rules.render_rule_groups(name=parent.name, namespace=parent.namespace,
                                      alerts=spec.monitoring.alerts.wire())
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
        render_service(parent),
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
