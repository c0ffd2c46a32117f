{{/*
Names, labels and the collector configuration of the log plane (`logs.*`): an OpenTelemetry Collector
DaemonSet shipping the serving pods' JSON lines, and an optional bundled VictoriaLogs.
*/}}

{{- define "slm-monitoring.logs.collector.fullname" -}}
{{- printf "%s-log-collector" (include "slm-monitoring.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slm-monitoring.logs.store.fullname" -}}
{{- printf "%s-victorialogs" (include "slm-monitoring.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slm-monitoring.logs.collector.selectorLabels" -}}
{{ include "slm-monitoring.selectorLabels" . }}
app.kubernetes.io/component: log-collector
{{- end }}

{{- define "slm-monitoring.logs.collector.labels" -}}
{{ include "slm-monitoring.labels" . }}
app.kubernetes.io/component: log-collector
{{- end }}

{{- define "slm-monitoring.logs.store.selectorLabels" -}}
{{ include "slm-monitoring.selectorLabels" . }}
app.kubernetes.io/component: log-store
{{- end }}

{{- define "slm-monitoring.logs.store.labels" -}}
{{ include "slm-monitoring.labels" . }}
app.kubernetes.io/component: log-store
{{- end }}

{{/*
`logs.retention` in hours, failing below VictoriaLogs' minimum of one day (it would not start).
*/}}
{{- define "slm-monitoring.logs.retentionHours" -}}
{{- $r := .Values.logs.retention -}}
{{- $n := int (trimSuffix "h" (trimSuffix "d" (trimSuffix "w" (trimSuffix "y" $r)))) -}}
{{- $hours := dict "h" 1 "d" 24 "w" 168 "y" 8760 -}}
{{- $total := mul $n (get $hours (substr (int (sub (len $r) 1)) (len $r) $r)) -}}
{{- if lt (int $total) 24 -}}
{{- fail (printf "logs.retention=%s is shorter than one day, the least VictoriaLogs keeps (-retentionPeriod)" $r) -}}
{{- end -}}
{{- $total -}}
{{- end }}

{{/*
Whether the bundled VictoriaLogs is deployed.
*/}}
{{- define "slm-monitoring.logs.store.enabled" -}}
{{- if and .Values.logs.enabled .Values.logs.store.enabled }}true{{ end -}}
{{- end }}

{{/*
The OTLP/HTTP base URL the collector ships to (the exporter appends /v1/logs): the one in values, else the
bundled VictoriaLogs' OpenTelemetry endpoint.
*/}}
{{- define "slm-monitoring.logs.endpoint" -}}
{{- if .Values.logs.collector.exporter.endpoint -}}
{{- .Values.logs.collector.exporter.endpoint -}}
{{- else if include "slm-monitoring.logs.store.enabled" . -}}
{{- printf "http://%s.%s.svc:%d/insert/opentelemetry" (include "slm-monitoring.logs.store.fullname" .) .Release.Namespace (int .Values.logs.store.service.port) -}}
{{- else -}}
{{- fail "logs.enabled is true but there is nowhere to ship the logs: set logs.collector.exporter.endpoint (your OTLP/HTTP log store) or leave logs.store.enabled on (the bundled VictoriaLogs)" -}}
{{- end -}}
{{- end }}

{{/*
An image reference {repository, tag, digest}: `repository:tag@digest`, as the chart's other third-party
images (slm-monitoring.pinnedImage): the tag for people reading the manifests, the digest for the kubelet.
*/}}
{{- define "slm-monitoring.logs.image" -}}
{{- include "slm-monitoring.pinnedImage" . -}}
{{- end }}

{{/*
Where, inside the collector's container, the host's pod logs and its state (checkpointed offsets and the
persistent sending queue) are mounted. The pod logs are mounted at the path kubelet writes them to, so
the file paths in the records are the node's.
*/}}
{{- define "slm-monitoring.logs.collector.stateDir" -}}/var/lib/otelcol-slm{{- end }}

{{/*
The collector configuration (config.yaml of the ConfigMap). slm_devtools.logplane runs the collector
locally with exactly this text, read from `helm template` output; it changes only the host paths, the
listening addresses and how the API server is reached (see that module).
*/}}
{{- define "slm-monitoring.logs.collector.config" -}}
{{- $c := .Values.logs.collector -}}
{{- $logs := trimSuffix "/" $c.podLogsPath -}}
{{- $state := include "slm-monitoring.logs.collector.stateDir" . -}}
extensions:
  health_check:
    endpoint: ${env:POD_IP}:13133
  # One bbolt database per component on the node's disk (hostPath): the file offsets and the sending
  # queue survive a restart of the collector and a rollout of the DaemonSet.
  file_storage:
    directory: {{ $state }}
    timeout: 10s
    compaction:
      on_start: true
      on_rebound: true
      directory: {{ $state }}

receivers:
  filelog:
    include:
      {{- range $c.containers }}
      - {{ printf "%s/*_*_*/%s/*.log" $logs . }}
      {{- end }}
      {{- if $c.includeOperator }}
      # The operator of this release (its pods are named <operator Deployment>-<hash>-<hash>).
      - {{ printf "%s/%s_%s-*_*/operator/*.log" $logs .Release.Namespace (include "slm-monitoring.operator.fullname" .) }}
      {{- end }}
    # A file first seen is read from its start: lines a pod wrote before the collector ran are shipped
    # too. Files already known resume at their checkpointed offset (storage below).
    start_at: beginning
    include_file_path: true
    include_file_name: false
    storage: file_storage
    poll_interval: {{ $c.pollInterval }}
    max_log_size: {{ $c.maxLineSize }}
    # When the pipeline refuses lines (memory limit, a full sending queue), keep retrying the same lines
    # rather than dropping them: the files wait on the node's disk.
    retry_on_failure:
      enabled: true
      initial_interval: 1s
      max_interval: 30s
      max_elapsed_time: 0s
    operators:
      # The CRI line (containerd, CRI-O): `<time> <stdout|stderr> <P|F> <text>`. Parsed with these
      # operators rather than the `container` operator: in this release that operator hands its lines
      # on through an internal batching emitter, so a crash could lose the lines of the last 100 ms after
      # their offset was saved (fixed upstream after this release:
      # https://github.com/open-telemetry/opentelemetry-collector-contrib/issues/47828).
      - type: regex_parser
        id: cri
        regex: '^(?P<time>[^ ]+) (?P<stream>stdout|stderr) (?P<logtag>[PF]) ?(?P<log>.*)$'
        timestamp:
          parse_from: attributes.time
          layout_type: gotime
          layout: '2006-01-02T15:04:05.999999999Z07:00'
      # A line longer than the runtime's buffer (16 KiB) comes in `P` parts ending with an `F` one.
      - type: recombine
        id: cri-partial-lines
        combine_field: attributes.log
        combine_with: ""
        is_last_entry: "attributes.logtag == 'F'"
        source_identifier: attributes["log.file.path"]
        max_log_size: {{ $c.maxLineSize }}
      - type: move
        from: attributes.log
        to: body
      - type: move
        from: attributes.stream
        to: attributes["log.iostream"]
      - type: remove
        field: attributes.time
      - type: remove
        field: attributes.logtag
      # The pod's namespace, name and uid and the container's name, from the file's path
      # (<namespace>_<pod>_<uid>/<container>/<restarts>.log): the uid is how k8sattributes finds the pod.
      - type: regex_parser
        id: pod-from-path
        parse_from: attributes["log.file.path"]
        parse_to: resource
        regex: '^.*/(?P<namespace>[^_/]+)_(?P<pod>[^_/]+)_(?P<uid>[a-f0-9-]+)/(?P<container>[^._/]+)/(?P<restarts>\d+)\.log$'
        cache:
          size: 256
      - type: move
        from: resource.namespace
        to: resource["k8s.namespace.name"]
      - type: move
        from: resource.pod
        to: resource["k8s.pod.name"]
      - type: move
        from: resource.uid
        to: resource["k8s.pod.uid"]
      - type: move
        from: resource.container
        to: resource["k8s.container.name"]
      - type: move
        from: resource.restarts
        to: resource["k8s.container.restart_count"]
      # The server's and the sidecar's line: {"timestamp", "level", "logger", "message", "event", and
      # the OpenTelemetry GenAI and HTTP attributes (gen_ai.*, http.*), "trace_id", "span_id", …}.
      # Every field becomes a log attribute under the name the server wrote. Only a line that looks like
      # a JSON object is parsed; anything else (a traceback, a library's plain print), or a line that is
      # not valid JSON after all (on_error: send_quiet), is kept as it is, its text in the body.
      - type: json_parser
        id: json
        if: 'body matches "^\\s*\\{"'
        on_error: send_quiet
        # The record's time, severity and trace context, from the fields the server writes (a field a line
        # lacks is left unset, the rest still parsed).
        timestamp:
          parse_from: attributes.timestamp
          layout_type: gotime
          layout: '2006-01-02T15:04:05Z07:00'
        severity:
          parse_from: attributes.level
          mapping:
            fatal: critical
        trace:
          trace_id:
            parse_from: attributes.trace_id
          span_id:
            parse_from: attributes.span_id
      # kopf (the operator) writes `severity`, not `level`.
      - type: severity_parser
        id: kopf-severity
        if: 'attributes.severity != nil and attributes.level == nil'
        parse_from: attributes.severity
        on_error: send_quiet
        mapping:
          fatal: critical
      # The record's own fields now hold them; the attributes would only repeat them. (No `if`: a line
      # without the field goes on unchanged, and skipping the condition is cheaper per line.)
      - type: remove
        field: attributes.timestamp
        on_error: send_quiet
      - type: remove
        field: attributes.trace_id
        on_error: send_quiet
      - type: remove
        field: attributes.span_id
        on_error: send_quiet
      - type: move
        id: body
        from: attributes.message
        to: body
        on_error: send_quiet

processors:
  memory_limiter:
    check_interval: 1s
    limit_percentage: 80
    spike_limit_percentage: 20
  # Pod metadata from the API server, for the pods of this node only.
  k8s_attributes:
    auth_type: serviceAccount
    filter:
      node_from_env_var: K8S_NODE_NAME
    # Wait for the pod list before the first line: a line of a pod not yet known would lose its
    # deployment name (and be dropped below).
    wait_for_metadata: true
    wait_for_metadata_timeout: 30s
    pod_association:
      - sources:
          - from: resource_attribute
            name: k8s.pod.uid
    extract:
      metadata:
        - k8s.namespace.name
        - k8s.pod.name
        - k8s.pod.uid
        - k8s.node.name
      labels:
        # The SLMDeployment's name, from the label the operator puts on its pods.
        - tag_name: slm.deployment
          key: slm.dev/deployment
          from: pod
  # Lines of pods that are not an SLMDeployment's (another application's container named like ours)
  # stay out of the store; the operator's own lines are kept.
  filter/slm-pods:
    error_mode: ignore
    logs:
      log_record:
        - 'resource.attributes["slm.deployment"] == nil and resource.attributes["k8s.container.name"] != "operator"'

exporters:
  otlp_http:
    endpoint: {{ include "slm-monitoring.logs.endpoint" . | quote }}
    {{- /* zstd costs the collector ~20 % less CPU than gzip (bench/bench_logs.py); VictoriaLogs takes it,
    other stores are sent gzip, which every OTLP/HTTP receiver takes, unless told otherwise. */}}
    compression: {{ $c.exporter.compression | default (ternary "gzip" "zstd" (not (empty $c.exporter.endpoint))) }}
    timeout: {{ $c.exporter.timeout }}
    {{- if or $c.exporter.headers $c.exporter.authorizationSecretRef.name }}
    headers:
      {{- range $name, $value := $c.exporter.headers }}
      {{ $name | quote }}: {{ $value | quote }}
      {{- end }}
      {{- if $c.exporter.authorizationSecretRef.name }}
      # Read from the mounted Secret when the collector starts.
      Authorization: ${file:/secrets/exporter/authorization}
      {{- end }}
    {{- end }}
    {{- with $c.exporter.tls }}
    tls:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    # A store that is down or refuses lines: retry for as long as it takes (never drop a batch), from
    # a queue on the node's disk that survives a restart of the collector.
    retry_on_failure:
      enabled: true
      initial_interval: 1s
      max_interval: 30s
      max_elapsed_time: 0s
    sending_queue:
      enabled: true
      storage: file_storage
      sizer: items
      queue_size: {{ int $c.queue.maxLines }}
      # A full queue holds the reading back (the lines wait in their files) instead of dropping lines.
      block_on_overflow: true
      num_consumers: {{ int $c.queue.consumers }}
      batch:
        flush_timeout: {{ $c.queue.flushTimeout }}
        min_size: 2000
        max_size: 10000

service:
  extensions:
    - health_check
    - file_storage
  telemetry:
    logs:
      level: {{ $c.logLevel }}
      encoding: json
    metrics:
      level: basic
      readers:
        - pull:
            exporter:
              prometheus:
                host: ${env:POD_IP}
                port: 8888
  pipelines:
    logs:
      receivers:
        - filelog
      processors:
        - memory_limiter
        - k8s_attributes
        - filter/slm-pods
      exporters:
        - otlp_http
{{- end }}
