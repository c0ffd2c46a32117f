{{/*
Namespace of the DCGM exporter's objects: `dcgmExporter.namespace`, else the release's.
*/}}
{{- define "slm-monitoring.dcgmExporter.namespace" -}}
{{- default .Release.Namespace .Values.dcgmExporter.namespace -}}
{{- end }}

{{/*
The DCGM fields the chart's recording rules, alerts and dashboards read: the `dcgm_exporter` list of the
operator's slm_operator/monitoring/data/metrics.yaml (tests/chart/test_dcgm.py holds the two equal).
One `field, type, help` line each, as in the exporter's own counters files. No profiling field
(`DCGM_FI_PROF_*`): DCGM needs SYS_ADMIN for those.
*/}}
{{- define "slm-monitoring.dcgmExporter.requiredCounters" -}}
DCGM_FI_DEV_GPU_UTIL, gauge, GPU utilization (in %).
DCGM_FI_DEV_FB_USED, gauge, Framebuffer memory used (in MiB).
DCGM_FI_DEV_FB_FREE, gauge, Framebuffer memory free (in MiB).
DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature (in C).
DCGM_FI_DEV_POWER_USAGE, gauge, Power draw (in W).
DCGM_FI_DEV_XID_ERRORS, gauge, Value of the last XID error encountered.
{{- end }}

{{/*
The exporter's counters file: the required fields, then `dcgmExporter.extraCounters` (a field listed
twice is exported once).
*/}}
{{- define "slm-monitoring.dcgmExporter.counters" -}}
{{- $required := include "slm-monitoring.dcgmExporter.requiredCounters" . -}}
{{- $fields := list -}}
{{- range splitList "\n" $required }}{{ $fields = append $fields (splitList "," . | first | trim) }}{{ end -}}
# DCGM field, Prometheus metric type, help (written by the slm-monitoring chart).
{{ $required }}
{{- range .Values.dcgmExporter.extraCounters }}
{{- if not (has .field $fields) }}
{{ .field }}, {{ .type }}, {{ .help | default .field }}
{{- $fields = append $fields .field }}
{{- end }}
{{- end }}
{{- end }}
