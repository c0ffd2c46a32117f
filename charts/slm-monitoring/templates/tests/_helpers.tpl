{{/*
Pod-level settings shared by the `helm test` Jobs: the restricted Pod Security Standard, so they run in
namespaces that enforce it.
*/}}
{{- define "slm-monitoring.tests.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{- define "slm-monitoring.tests.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  capabilities:
    drop:
      - ALL
resources:
  requests:
    cpu: 10m
    memory: 32Mi
  limits:
    cpu: 100m
    memory: 64Mi
{{- end }}

{{/*
Hook annotations: deleted once they pass (so `helm uninstall` leaves nothing behind), kept after a
failure for `kubectl logs`, and replaced by the next `helm test`.
*/}}
{{- define "slm-monitoring.tests.hookAnnotations" -}}
helm.sh/hook: test
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}

{{- define "slm-monitoring.tests.fullname" -}}
{{- printf "%s-test" (include "slm-monitoring.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slm-monitoring.tests.labels" -}}
{{ include "slm-monitoring.labels" . }}
app.kubernetes.io/component: test
{{- end }}
