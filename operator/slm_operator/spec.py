"""The SLMDeployment spec as a typed model, and the names and labels its children share (pure, no API calls).

`SLMDeploymentSpec` is the one place the operator writes the spec's defaults (the alert defaults come
from slm_operator.monitoring.defaults, which the rule and dashboard renderers read too);
tests/operator/test_spec.py holds them equal to the CRD's schema defaults in manifests/crds/.
The API server has already validated and defaulted what the operator reads, so a spec that does not
fit this model means the CRD and the operator disagree: the reconcile reports it as InvalidSpec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from slm_operator import GROUP, KIND, VERSION
from slm_operator import runtimes as runtime_catalog
from slm_operator.monitoring.defaults import merged_alerts

API_VERSION = f"{GROUP}/{VERSION}"
PART_OF = "slm-monitoring"
APP_NAME = "slm-server"
MANAGED_BY = "slm-operator"
# Carried by every child so a child event finds its SLMDeployment without reading ownerReferences.
PARENT_LABEL = "slm.dev/deployment"
SERVER_PORT = 8000
# Where the model volume is mounted in every serving container (a claim read-only, else the download cache).
DATA_DIR = "/data"
BUILTIN: Final = "builtin"
Runtime = Literal["builtin", "vllm", "sglang", "tgi", "llamacpp"]

Severity = Literal["critical", "warning", "info"]
Quantity = int | str  # int-or-string, checked by the CRD's isQuantity rules


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; an unknown field is an error, not silently dropped."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The spec as the API server holds it (camelCase, unset optional fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class SecretKeyRef(_Model):
    """A key of a Secret in the SLMDeployment's namespace."""

    name: str
    key: str


# --- spec.model -------------------------------------------------------------------------------------

class PvcSource(_Model):
    claim_name: str
    sub_path: str | None = None


class ModelSource(_Model):
    pvc: PvcSource


class ModelSpec(_Model):
    name: str
    revision: str = "main"
    served_name: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    source: ModelSource | None = None
    # The file of the source a one-file runtime loads (llama.cpp: a .gguf), relative to the source's directory.
    file: str | None = None
    # Tokens of context (prompt and output) a third-party runtime sizes its KV cache for; None: the model's own.
    context_length: int | None = None
    hf_token_secret_ref: SecretKeyRef | None = None

    @property
    def served(self) -> str:
        """The name in /v1/models and in the `model` metric label."""
        return self.served_name or self.name


# --- serving ------------------------------------------------------------------------------------------

class Resources(_Model):
    gpus: int = 1
    requests: dict[str, Quantity] | None = None
    limits: dict[str, Quantity] | None = None
    model_cache_size_limit: str = "20Gi"
    tmp_size_limit: str = "1Gi"
    shm_size_limit: str = "1Gi"


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class ServerSpec(_Model):
    max_new_tokens: int = 512
    max_concurrent_requests: int = 8
    max_batch_size: int = 0
    prefill_chunk_tokens: int = 512
    prefix_cache_mib: int = Field(512, alias="prefixCacheMiB")
    max_queue: int = 32
    request_timeout_seconds: int = 60
    startup_timeout_seconds: int = 600
    faults_admin: bool = False
    admin_token_secret_ref: SecretKeyRef | None = None


class LoggingSpec(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    outputs: Literal["none", "hash", "truncated", "full"] = "hash"
    sample_rate: float = 1.0
    output_hash_key_secret_ref: SecretKeyRef | None = None


class NetworkPolicySpec(_Model):
    enabled: bool = True
    allowed_namespaces: list[str] = Field(default_factory=list)
    prometheus_namespaces: list[str] = Field(default_factory=list)


# --- spec.monitoring ------------------------------------------------------------------------------------

class PrometheusSpec(_Model):
    service_monitor_labels: dict[str, str] | None = None
    rule_labels: dict[str, str] | None = None


class DashboardsSpec(_Model):
    enabled: bool = True
    labels: dict[str, str] = Field(default_factory=lambda: {"grafana_dashboard": "1"})
    folder: str = "SLM"


class AlertTiming(_Model):
    for_: str = Field(alias="for")
    severity: Severity


class ErrorRateAlert(AlertTiming):
    threshold: float
    window: str


class ThresholdSecondsAlert(AlertTiming):
    threshold_seconds: float


class ThresholdPercentAlert(AlertTiming):
    threshold_percent: float


class ThresholdPerSecondAlert(AlertTiming):
    threshold_per_second: float


class DiskSpaceAlert(AlertTiming):
    min_free_percent: float
    mountpoint: str


class DriftAlert(AlertTiming):
    z_score: float
    window: str
    baseline_window: str


class SloSpec(_Model):
    availability_percent: float
    window: str
    page_severity: Severity
    ticket_severity: Severity


class AlertsSpec(_Model):
    """Every alert's settings; what the spec leaves out comes from monitoring.defaults.ALERT_DEFAULTS."""

    error_rate: ErrorRateAlert
    latency_p95: ThresholdSecondsAlert = Field(alias="latencyP95")
    gpu_utilization: ThresholdPercentAlert
    gpu_memory: ThresholdPercentAlert
    disk_space: DiskSpaceAlert
    time_to_first_token: ThresholdSecondsAlert
    queue_saturation: ThresholdPercentAlert
    perplexity_drift: DriftAlert
    output_length_drift: DriftAlert
    gpu_xid_errors: AlertTiming
    gpu_metrics_absent: AlertTiming
    target_down: AlertTiming
    pod_crash_looping: AlertTiming
    pod_not_ready: AlertTiming
    scrape_target_missing: AlertTiming
    fault_injection_enabled: AlertTiming
    kv_cache_saturation: ThresholdPercentAlert
    request_preemptions: ThresholdPerSecondAlert
    slo: SloSpec
    disabled: list[str]
    runbook_base_url: str = Field(alias="runbookBaseURL")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        # Per alert and per field, as the CRD's structural defaulting does.
        return merged_alerts(dict(data)) if isinstance(data, Mapping) else data


class SlackReceiver(_Model):
    channel: str
    api_url_secret_ref: SecretKeyRef = Field(alias="apiURLSecretRef")
    severities: list[Severity] | None = None


class EmailReceiver(_Model):
    to: list[str]
    from_: str = Field(alias="from")
    smarthost: str
    auth_username: str | None = None
    auth_secret_ref: SecretKeyRef | None = None
    require_tls: bool | None = Field(None, alias="requireTLS")
    severities: list[Severity] | None = None


class WebhookReceiver(_Model):
    url_secret_ref: SecretKeyRef
    severities: list[Severity] | None = None


class NotificationsSpec(_Model):
    group_wait: str = "30s"
    group_interval: str = "5m"
    repeat_interval: str = "4h"
    slack: SlackReceiver | None = None
    email: EmailReceiver | None = None
    webhook: WebhookReceiver | None = None


class MonitoringSpec(_Model):
    enabled: bool = True
    scrape_interval: str = "15s"
    prometheus: PrometheusSpec = Field(default_factory=PrometheusSpec)
    dashboards: DashboardsSpec = Field(default_factory=DashboardsSpec)
    alerts: AlertsSpec = Field(default_factory=lambda: AlertsSpec.model_validate({}))
    notifications: NotificationsSpec | None = None


class SLMDeploymentSpec(_Model):
    """`spec` of an SLMDeployment, defaulted as the CRD defaults it."""

    model: ModelSpec
    runtime: Runtime = BUILTIN
    runtime_args: list[str] = Field(default_factory=list)
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    replicas: int = 1
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None
    server: ServerSpec = Field(default_factory=lambda: ServerSpec.model_validate({}))
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)

    @model_validator(mode="after")
    def _runtime_can_serve_it(self) -> SLMDeploymentSpec:
        # The CRD's CEL rules refuse most of this at admission; what they cannot see (a flag in runtimeArgs
        # the operator owns, among them) is refused here, and the reconcile reports it as InvalidSpec.
        if self.runtime == BUILTIN:
            if self.runtime_args:
                raise ValueError("runtimeArgs: the builtin runtime takes no extra flags (its settings are spec.server)")
            return self
        runtime_catalog.render_runtime(self.runtime, **self.runtime_parameters())
        return self

    def model_path(self) -> str:
        """What a third-party runtime loads: the hub id, or a path in the mounted source (llama.cpp: its file)."""
        if self.model.source is None:
            return self.model.name
        return f"{DATA_DIR}/{self.model.file}" if self.model.file else DATA_DIR

    def runtime_parameters(self, *, port: int = SERVER_PORT) -> dict[str, Any]:
        """The keyword arguments of slm_operator.runtimes.render_runtime for this spec."""
        return {
            "model": self.model_path(),
            "served_model_name": self.model.served,
            "port": port,
            "revision": self.model.revision,
            "dtype": self.model.dtype,
            "max_context": self.model.context_length,
            "gpus": self.resources.gpus,
            "extra_args": list(self.runtime_args),
            # The hub download goes to the model volume (sized by modelCacheSizeLimit); with the weights on a
            # claim, mounted read-only there, the runtime's small caches go to /tmp.
            "cache_dir": "/tmp" if self.model.source is not None else DATA_DIR,  # noqa: S108
        }

    def secret_refs(self) -> list[tuple[str, SecretKeyRef]]:
        """(field path, reference) of every Secret the notifications reference."""
        notifications = self.monitoring.notifications
        refs: list[tuple[str, SecretKeyRef | None]] = []
        if notifications is not None:
            refs = [
                ("spec.monitoring.notifications.slack.apiURLSecretRef",
                 notifications.slack.api_url_secret_ref if notifications.slack else None),
                ("spec.monitoring.notifications.email.authSecretRef",
                 notifications.email.auth_secret_ref if notifications.email else None),
                ("spec.monitoring.notifications.webhook.urlSecretRef",
                 notifications.webhook.url_secret_ref if notifications.webhook else None),
            ]
        return [(path, ref) for path, ref in refs if ref is not None]


def parse_spec(spec: Mapping[str, Any] | None) -> SLMDeploymentSpec:
    """The typed spec; raises pydantic.ValidationError (naming the field) when it does not fit."""
    return SLMDeploymentSpec.model_validate(dict(spec or {}))


# --- identity, names and labels -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Parent:
    """The identity of one SLMDeployment (what every child points back to)."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Parent:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])

    def owner_reference(self) -> dict[str, Any]:
        # controller=true: `kubectl get` shows the owner and the garbage collector deletes in the
        # background; blockOwnerDeletion stays false so the operator needs no finalizers RBAC on the CR.
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": False,
        }

    def owns(self, obj: Mapping[str, Any]) -> bool:
        """Whether `obj` names this SLMDeployment (this very one: by uid) among its owners."""
        owners = (obj.get("metadata") or {}).get("ownerReferences") or []
        return any(o.get("uid") == self.uid for o in owners)

    def selector_labels(self) -> dict[str, str]:
        """The pod selector: stable for the life of the deployment, never a version."""
        return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": self.name}

    def labels(self, component: str) -> dict[str, str]:
        return {
            **self.selector_labels(),
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": MANAGED_BY,
            PARENT_LABEL: self.name,
        }

    @property
    def selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector_labels().items()))

    @property
    def endpoint(self) -> str:
        return f"http://{self.name}.{self.namespace}.svc:{SERVER_PORT}"


def child_names(name: str) -> dict[str, str]:
    """Deterministic child names per kind (a retry or a restarted operator finds the same object)."""
    return {
        "Deployment": name,
        "Service": name,
        "PodDisruptionBudget": name,
        "NetworkPolicy": name,
        "ServiceMonitor": name,
        "PrometheusRule": name,
        "ConfigMap": f"{name}-dashboard",
        "AlertmanagerConfig": name,
    }


def lookup(obj: Mapping[str, Any] | None, path: str, default: Any = None) -> Any:
    """`obj["a"]["b"]` for path "a.b" of a live object, or `default` when any step is missing or None.

    For objects the API server returns (children, nodes, Prometheus resources); the spec is typed.
    """
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, Mapping) or current.get(part) is None:
            return default
        current = current[part]
    return current
