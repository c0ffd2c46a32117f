{{/*
Chart name, truncated to 63 characters (the DNS label limit every object name must fit).
*/}}
{{- define "slm-monitoring.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: the release name, followed by the chart name unless the release name already
contains it. Truncated to 63 characters, leaving room for the component suffixes used below.
*/}}
{{- define "slm-monitoring.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the operator's objects (Deployment, Service, ServiceMonitor, …). The Prometheus `job` label of
its series is this name, because a ServiceMonitor names the job after the Service.
*/}}
{{- define "slm-monitoring.operator.fullname" -}}
{{- printf "%s-operator" (include "slm-monitoring.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the DCGM exporter's objects; also the `job` label of its series.
*/}}
{{- define "slm-monitoring.dcgmExporter.fullname" -}}
{{- printf "%s-dcgm-exporter" (include "slm-monitoring.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "slm-monitoring.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object. Versions appear here but never in selectors (selectors are immutable, a
version in them would break `helm upgrade`).
*/}}
{{- define "slm-monitoring.labels" -}}
helm.sh/chart: {{ include "slm-monitoring.chart" . }}
{{ include "slm-monitoring.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: slm-monitoring
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels shared by all components; each component adds app.kubernetes.io/component.
*/}}
{{- define "slm-monitoring.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slm-monitoring.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "slm-monitoring.operator.selectorLabels" -}}
{{ include "slm-monitoring.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "slm-monitoring.operator.labels" -}}
{{ include "slm-monitoring.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "slm-monitoring.dcgmExporter.selectorLabels" -}}
{{ include "slm-monitoring.selectorLabels" . }}
app.kubernetes.io/component: dcgm-exporter
{{- end }}

{{- define "slm-monitoring.dcgmExporter.labels" -}}
{{ include "slm-monitoring.labels" . }}
app.kubernetes.io/component: dcgm-exporter
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "slm-monitoring.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "slm-monitoring.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {registry, repository, tag, digest}: the digest wins over the tag; an empty
registry falls back to .Values.imageRegistry and an empty tag to the chart's appVersion.
Usage: include "slm-monitoring.image" (dict "image" .Values.operator.image "root" .)
*/}}
{{- define "slm-monitoring.image" -}}
{{- $registry := default .root.Values.imageRegistry .image.registry -}}
{{- $repository := .image.repository -}}
{{- if $registry }}{{ $repository = printf "%s/%s" $registry .image.repository }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end }}

{{/*
A third-party image reference from {repository, tag, digest}: `repository:tag@digest` when both are set
(the tag for people reading the manifests, the digest for the kubelet), else whichever is set.
Usage: include "slm-monitoring.pinnedImage" .Values.dcgmExporter.image
*/}}
{{- define "slm-monitoring.pinnedImage" -}}
{{- $reference := .repository -}}
{{- with .tag }}{{ $reference = printf "%s:%s" $reference . }}{{ end -}}
{{- with .digest }}{{ $reference = printf "%s@%s" $reference . }}{{ end -}}
{{- $reference -}}
{{- end }}

{{/*
Labels that make Prometheus select a monitoring object: kube-prometheus-stack's default selectors
match `release: <its release name>`.
Usage: include "slm-monitoring.monitorLabels" (dict "extra" .Values.operator.serviceMonitor.labels "root" .)
*/}}
{{- define "slm-monitoring.monitorLabels" -}}
{{- with .root.Values.kubePrometheusStack.release }}
release: {{ . | quote }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Whether the operator watches every namespace (no watchNamespaces given).
*/}}
{{- define "slm-monitoring.operator.clusterWide" -}}
{{- if not .Values.operator.watchNamespaces }}true{{ end -}}
{{- end }}
