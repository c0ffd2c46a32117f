{{/*
The operator's permissions, kept in one place and split by scope. Every rule lists its API group,
resources and verbs explicitly: no wildcards, no `list`/`watch` on Secrets. The SubjectAccessReview
tests in tests/chart/ prove what these rules allow and what they do not; tests/operator/test_rbac.py
holds them equal to the verbs the operator's code and kopf use (nothing more, nothing less).
*/}}

{{/*
Rules on namespaced objects: in a ClusterRole when the operator watches every namespace, in a Role per
watched namespace otherwise.
*/}}
{{- define "slm-monitoring.operator.namespacedRules" -}}
# The SLMDeployments it reconciles: kopf lists and watches them and patches its progress annotations;
# a child's event reads its SLMDeployment.
- apiGroups: ["slm.dev"]
  resources: ["slmdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["slm.dev"]
  resources: ["slmdeployments/status"]
  verbs: ["patch"]
# The children it owns per SLMDeployment: watched (label-filtered), read before each write, created and
# patched by server-side apply. Serving children are never deleted by the operator (the garbage collector
# does it with their SLMDeployment); the optional ones are, when the spec stops asking for them.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Not watched (a watch on a CRD that is deleted ends the operator): listed once per resync instead.
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors", "prometheusrules", "alertmanagerconfigs"]
  verbs: ["get", "list", "create", "patch", "delete"]
# Kubernetes Events about what it did and what failed.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.rbac.secretReferenceChecks }}
# Secrets that an SLMDeployment references are checked to exist, by name and metadata only (the operator
# asks for PartialObjectMetadata and never receives a value): `get` only, so it cannot enumerate Secrets.
# Their values are referenced by the objects it makes (AlertmanagerConfig, pod env), never copied.
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
  verbs: ["list"]
# kopf watches the CRDs to notice the resources it serves appearing or going.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
# Prometheus resources are read to learn their serviceMonitorSelector/ruleSelector and namespaces.
- apiGroups: ["monitoring.coreos.com"]
  resources: ["prometheuses"]
  verbs: ["list"]
{{- if not (include "slm-monitoring.operator.clusterWide" .) }}
# With --namespace, kopf lists and watches namespaces to follow the watched ones appearing and going
# (names only). Serving all namespaces it does not: no such rule then (both proved by the e2e tests).
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
