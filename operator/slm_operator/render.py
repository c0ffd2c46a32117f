"""Pure renderers: an SLMDeployment spec in, the list of child objects (plain dicts) out.

Kubernetes kinds come from Jinja2 templates (templates/<kind>.yaml.j2, one kind per file, every value
through `tojson` so no user string can break the YAML). The PrometheusRule, the dashboard ConfigMap and
the AlertmanagerConfig wrap what slm_operator.monitoring renders (rule groups, Grafana JSON, routing):
that content is data built in Python, never text-templated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import jinja2
import yaml

from slm_operator.monitoring import dashboards, notifications, rules
from slm_operator.spec import SERVER_PORT, Parent, child_names, get

COMPONENT_SERVER = "inference-server"
COMPONENT_MONITORING = "monitoring"
GPU_RESOURCE = "nvidia.com/gpu"
DATA_DIR = "/data"  # the model volume; also the default mountpoint of SLMLowDiskSpace


@dataclasses.dataclass(frozen=True)
class MonitorLabels:
    """Labels the Prometheus resources select monitors by (from the spec, else detected)."""

    service_monitor: Mapping[str, str] = dataclasses.field(default_factory=dict)
    rule: Mapping[str, str] = dataclasses.field(default_factory=dict)


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


def server_env(spec: Mapping[str, Any]) -> list[dict[str, str]]:
    """The SLM_* settings of the server (shared contract), in a fixed order."""
    has_pvc = get(spec, "model.source.pvc.claimName") is not None
    model_name = get(spec, "model.name")
    values: list[tuple[str, Any]] = [
        ("SLM_MODEL", DATA_DIR if has_pvc else model_name),
        ("SLM_MODEL_REVISION", get(spec, "model.revision", "main")),
        ("SLM_MODEL_NAME", get(spec, "model.servedName") or model_name),
        ("SLM_DTYPE", get(spec, "model.dtype", "auto")),
        ("SLM_HOST", "0.0.0.0"),  # noqa: S104 - a pod listens on its own IP
        ("SLM_PORT", SERVER_PORT),
        ("SLM_MAX_NEW_TOKENS", get(spec, "server.maxNewTokens", 512)),
        ("SLM_MAX_CONCURRENT_REQUESTS", get(spec, "server.maxConcurrentRequests", 8)),
        ("SLM_MAX_BATCH_SIZE", get(spec, "server.maxBatchSize", 0)),
        ("SLM_PREFILL_CHUNK_TOKENS", get(spec, "server.prefillChunkTokens", 512)),
        ("SLM_PREFIX_CACHE_MIB", get(spec, "server.prefixCacheMiB", 512)),
        ("SLM_MAX_QUEUE", get(spec, "server.maxQueue", 32)),
        ("SLM_REQUEST_TIMEOUT_SECONDS", get(spec, "server.requestTimeoutSeconds", 60)),
        ("SLM_LOG_LEVEL", get(spec, "logging.level", "info")),
        ("SLM_LOG_OUTPUTS", get(spec, "logging.outputs", "hash")),
        ("SLM_LOG_SAMPLE_RATE", float(get(spec, "logging.sampleRate", 1.0))),
        ("SLM_DISK_PATHS", DATA_DIR),
        ("SLM_FAULTS_ADMIN", bool(get(spec, "server.faultsAdmin", False))),
        # The root filesystem is read-only: the hub cache lives on a writable volume.
        ("HF_HOME", "/tmp/huggingface" if has_pvc else f"{DATA_DIR}/huggingface"),  # noqa: S108
    ]
    if has_pvc:
        values.append(("HF_HUB_OFFLINE", "1"))  # weights come from the claim; never reach the hub
    return [{"name": key, "value": _env_value(value)} for key, value in values]


def _resources(spec: Mapping[str, Any]) -> dict[str, Any]:
    gpus = int(get(spec, "resources.gpus", 1))
    requests = dict(get(spec, "resources.requests", {}))
    limits = dict(get(spec, "resources.limits", {}))
    if gpus > 0:
        # Extended resources need only the limit; Kubernetes copies it to the request.
        limits[GPU_RESOURCE] = str(gpus)
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _tolerations(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    tolerations = [dict(t) for t in get(spec, "tolerations", [])]
    if int(get(spec, "resources.gpus", 1)) > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule (GKE, EKS, NVIDIA operator).
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _volumes(spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108
    pvc = get(spec, "model.source.pvc")
    if pvc:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": pvc["claimName"], "readOnly": True}})
        mount: dict[str, Any] = {"name": "model", "mountPath": DATA_DIR, "readOnly": True}
        if pvc.get("subPath"):
            mount["subPath"] = pvc["subPath"]
        mounts.append(mount)
    else:
        volumes.append({"name": "model", "emptyDir": {}})
        mounts.append({"name": "model", "mountPath": DATA_DIR})
    return volumes, mounts


def render_deployment(parent: Parent, spec: Mapping[str, Any], *, server_image: str) -> dict[str, Any]:
    volumes, mounts = _volumes(spec)
    startup_timeout = int(get(spec, "server.startupTimeoutSeconds", 600))
    return _from_template(
        "deployment.yaml.j2",
        **_metadata_context(parent, "Deployment", COMPONENT_SERVER),
        replicas=int(get(spec, "replicas", 1)),
        selector_labels=parent.selector_labels(),
        pod_labels=parent.labels(COMPONENT_SERVER),
        node_selector=dict(get(spec, "nodeSelector", {})),
        tolerations=_tolerations(spec),
        image=get(spec, "image") or server_image,
        image_pull_policy=get(spec, "imagePullPolicy"),
        env=server_env(spec),
        resources=_resources(spec),
        startup_failure_threshold=max(1, -(-startup_timeout // 10)),  # probe period is 10 s
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


def render_service_monitor(parent: Parent, spec: Mapping[str, Any], labels: MonitorLabels) -> dict[str, Any]:
    return _from_template(
        "servicemonitor.yaml.j2",
        **_metadata_context(parent, "ServiceMonitor", COMPONENT_MONITORING, labels.service_monitor),
        service_selector={**parent.selector_labels(), "app.kubernetes.io/component": COMPONENT_SERVER},
        interval=get(spec, "monitoring.scrapeInterval", "15s"),
    )


def render_prometheus_rule(parent: Parent, spec: Mapping[str, Any], labels: MonitorLabels) -> dict[str, Any]:
    groups = rules.render_rule_groups(
        name=parent.name, namespace=parent.namespace, alerts=get(spec, "monitoring.alerts")
    )
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(parent, "PrometheusRule", COMPONENT_MONITORING, labels.rule),
        "spec": {"groups": groups},
    }


def render_dashboard_config_map(parent: Parent, spec: Mapping[str, Any]) -> dict[str, Any]:
    dashboard = dashboards.render_dashboard(
        name=parent.name,
        namespace=parent.namespace,
        model=get(spec, "model.servedName") or get(spec, "model.name"),
        alerts=get(spec, "monitoring.alerts"),
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            parent,
            "ConfigMap",
            "dashboard",
            get(spec, "monitoring.dashboards.labels", {"grafana_dashboard": "1"}),
            # Read by the Grafana sidecar when its folderAnnotation is grafana_folder (kube-prometheus-stack).
            {"grafana_folder": get(spec, "monitoring.dashboards.folder", "SLM")},
        ),
        # Sorted keys: the same dashboard always serialises to the same bytes (no spurious writes).
        "data": {f"{parent.name}.json": json.dumps(dashboard, sort_keys=True, separators=(",", ":"))},
    }


def render_alertmanager_config(parent: Parent, spec: Mapping[str, Any], labels: MonitorLabels) -> dict[str, Any] | None:
    routing = notifications.render_alertmanager_config_spec(
        name=parent.name, namespace=parent.namespace, notifications=get(spec, "monitoring.notifications")
    )
    if routing is None:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1alpha1",
        "kind": "AlertmanagerConfig",
        "metadata": _metadata(parent, "AlertmanagerConfig", COMPONENT_MONITORING, labels.rule),
        "spec": routing,
    }


def render_children(
    parent: Parent, spec: Mapping[str, Any], *, server_image: str, monitor_labels: MonitorLabels | None = None
) -> list[dict[str, Any]]:
    """Every object the SLMDeployment should own right now, serving first, in a fixed order."""
    labels = monitor_labels or MonitorLabels(
        service_monitor=get(spec, "monitoring.prometheus.serviceMonitorLabels", {}),
        rule=get(spec, "monitoring.prometheus.ruleLabels", {}),
    )
    children = [
        render_deployment(parent, spec, server_image=server_image),
        render_service(parent),
        render_pod_disruption_budget(parent),
    ]
    if get(spec, "monitoring.enabled", True):
        children.append(render_service_monitor(parent, spec, labels))
        children.append(render_prometheus_rule(parent, spec, labels))
        if get(spec, "monitoring.dashboards.enabled", True):
            children.append(render_dashboard_config_map(parent, spec))
        alertmanager_config = render_alertmanager_config(parent, spec, labels)
        if alertmanager_config is not None:
            children.append(alertmanager_config)
    return children


def secret_refs(spec: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(field path, secret name, key) of every secret the notifications reference."""
    refs = []
    for path in (
        "monitoring.notifications.slack.apiURLSecretRef",
        "monitoring.notifications.email.authSecretRef",
        "monitoring.notifications.webhook.urlSecretRef",
    ):
        ref = get(spec, path)
        if ref:
            refs.append((f"spec.{path}", ref["name"], ref["key"]))
    return refs
