{{/*
The operator's permissions, kept in one place and split by scope. Every rule lists its API group,
resources and verbs explicitly: no wildcards, no `list`/`watch` on Secrets. The SubjectAccessReview
tests in tests/chart/ prove what these rules allow and what they do not.
*/}}

{{/*
Rules on namespaced objects: in a ClusterRole when the operator watches every namespace, in a Role per
watched namespace otherwise.
*/}}
{{- define "slm-monitoring.operator.namespacedRules" -}}
# The SLMDeployments it reconciles: patch for kopf's progress annotations and finalizers.
- apiGroups: ["slm.dev"]
  resources: ["slmdeployments"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["slm.dev"]
  resources: ["slmdeployments/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["slm.dev"]
  resources: ["slmdeployments/finalizers"]
  verbs: ["update"]
# The children it owns per SLMDeployment.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors", "prometheusrules", "alertmanagerconfigs"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# Serving pods are read to report readiness and crash loops in the status; never changed.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Kubernetes Events about what it did and what failed.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.rbac.secretReferenceChecks }}
# Secrets referenced by spec.monitoring.notifications are checked to exist, by name: `get` only, so
# the operator cannot enumerate Secrets. Their values are never copied (AlertmanagerConfig references them).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end }}

{{/*
Rules on cluster-scoped objects (and on Prometheus resources, which may live in any namespace):
always in a ClusterRole.
*/}}
{{- define "slm-monitoring.operator.clusterRules" -}}
# GPU capacity of the nodes, to report an SLMDeployment no node can ever schedule.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
# kopf discovers the resources it serves through the CRDs; the operator also notices the Prometheus
# Operator CRDs appearing, to create the monitors without a restart.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
# Prometheus resources are read to learn their serviceMonitorSelector/ruleSelector.
- apiGroups: ["monitoring.coreos.com"]
  resources: ["prometheuses"]
  verbs: ["get", "list", "watch"]
{{- if not (include "slm-monitoring.operator.clusterWide" .) }}
# With --namespace, kopf lists and watches namespaces to follow the watched ones appearing and going
# (names only). Serving all namespaces it does not: no such rule then (both proved by the e2e tests).
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
