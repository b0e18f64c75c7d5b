{{/* Names and labels. */}}
{{- define "llmtap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmtap.fullname" -}}
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

{{- define "llmtap.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "llmtap.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llmtap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmtap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The proxy's pods (the jobs' pods carry their own component). */}}
{{- define "llmtap.proxySelectorLabels" -}}
{{ include "llmtap.selectorLabels" . }}
app.kubernetes.io/component: proxy
{{- end }}

{{- define "llmtap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmtap.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llmtap.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "llmtap.dataDir" -}}/var/lib/llmtap{{- end }}

{{- define "llmtap.clickhouseEnabled" -}}
{{- if .Values.clickhouse.url }}true{{ end }}
{{- end }}

{{/*
Environment of the proxy and the fleet jobs, called with (dict "root" $ "proxy" bool): the
ClickHouse connection (the password only by reference to a Secret), with the fleet jobs on
the proxy's own scorer and drift detector off (the jobs do that work once for the fleet),
then the user's `env`. A name the user's `env` sets is left to it: one entry per name, so
`helm upgrade` can patch the list.
*/}}
{{- define "llmtap.env" -}}
{{- $v := .root.Values }}
{{- $chart := list }}
{{- with $v.clickhouse }}
{{- if .url }}
{{- $chart = append $chart (dict "name" "LLMTAP_CLICKHOUSE_URL" "value" .url) }}
{{- end }}
{{- if .user }}
{{- $chart = append $chart (dict "name" "LLMTAP_CLICKHOUSE_USER" "value" .user) }}
{{- end }}
{{- if .database }}
{{- $chart = append $chart (dict "name" "LLMTAP_CLICKHOUSE_DATABASE" "value" .database) }}
{{- end }}
{{- if .passwordSecret.name }}
{{- $chart = append $chart (dict "name" "LLMTAP_CLICKHOUSE_PASSWORD" "valueFrom" (dict "secretKeyRef" (dict "name" .passwordSecret.name "key" .passwordSecret.key))) }}
{{- end }}
{{- end }}
{{- if and .proxy $v.jobs.score.enabled }}
{{- $chart = append $chart (dict "name" "LLMTAP_SCORER_IN_PROCESS" "value" "false") }}
{{- end }}
{{- if and .proxy $v.jobs.drift.enabled }}
{{- $chart = append $chart (dict "name" "LLMTAP_DRIFT_ENABLED" "value" "false") }}
{{- end }}
{{- $mine := dict }}
{{- range $v.env }}
{{- $_ := set $mine .name true }}
{{- end }}
{{- $out := list }}
{{- range $chart }}
{{- if not (hasKey $mine .name) }}
{{- $out = append $out . }}
{{- end }}
{{- end }}
{{- $out = concat $out $v.env }}
{{- if $out }}
{{- toYaml $out }}
{{- end }}
{{- end }}

{{/*
The llmtap proxy container. Called with (dict "root" $ "listenHost" "0.0.0.0" "native" bool).
*/}}
{{- define "llmtap.container" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
- name: llmtap
  image: {{ include "llmtap.image" $root }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if .native }}
  restartPolicy: Always
  {{- end }}
  args:
    - serve
    - --config=/etc/llmtap/llmtap.toml
    - --listen={{ .listenHost }}:{{ $v.ports.proxy }}
    - --admin-listen=0.0.0.0:{{ $v.ports.admin }}
    - --data-dir={{ include "llmtap.dataDir" $root }}
  {{- $env := include "llmtap.env" (dict "root" $root "proxy" true) | trim }}
  {{- if $env }}
  env:
    {{- $env | nindent 4 }}
  {{- end }}
  {{- with $v.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: proxy
      containerPort: {{ $v.ports.proxy }}
      protocol: TCP
    - name: admin
      containerPort: {{ $v.ports.admin }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /healthz
      port: admin
    periodSeconds: 1
    failureThreshold: 60
  livenessProbe:
    httpGet:
      path: /healthz
      port: admin
    periodSeconds: 10
    timeoutSeconds: 2
    failureThreshold: 3
  readinessProbe:
    httpGet:
      # Only the listener: a full trace disk or a ClickHouse backlog drops records (counted,
      # alerted on) rather than taking the pod out of its Service.
      path: /readyz?exclude=log_writable&exclude=clickhouse_backlog
      port: admin
    periodSeconds: 5
    timeoutSeconds: 2
    failureThreshold: 2
  {{- if $v.preStopSleepSeconds }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ $v.preStopSleepSeconds }}
  {{- end }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: llmtap-config
      mountPath: /etc/llmtap
      readOnly: true
    - name: llmtap-data
      mountPath: {{ include "llmtap.dataDir" $root }}
{{- end }}

{{/*
Pod-level settings shared by every workload of the chart. In sidecar mode the pod is the
app's: its security context is sidecar.podSecurityContext (llmtap's own settings are on its
container).
*/}}
{{- define "llmtap.podSpecCommon" -}}
serviceAccountName: {{ include "llmtap.serviceAccountName" . }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ternary .Values.sidecar.podSecurityContext .Values.podSecurityContext (eq .Values.mode "sidecar") }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Pod annotations: the config's checksum (a changed config rolls the pods) and scraping; the
user's podAnnotations win a clash.
*/}}
{{- define "llmtap.podAnnotations" -}}
{{- $ann := dict "checksum/config" (include (print .Template.BasePath "/configmap.yaml") . | sha256sum) }}
{{- if .Values.metrics.podAnnotations }}
{{- $_ := merge $ann (dict "prometheus.io/scrape" "true" "prometheus.io/port" (toString .Values.ports.admin) "prometheus.io/path" "/metrics") }}
{{- end }}
{{- toYaml (mergeOverwrite $ann .Values.podAnnotations) }}
{{- end }}
