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
Environment shared by the proxy and the fleet jobs: the ClickHouse connection (the password
only by reference to a Secret) and the user's own variables.
*/}}
{{- define "llmtap.env" -}}
{{- if .Values.clickhouse.url }}
- name: LLMTAP_CLICKHOUSE_URL
  value: {{ .Values.clickhouse.url | quote }}
- name: LLMTAP_CLICKHOUSE_USER
  value: {{ .Values.clickhouse.user | quote }}
- name: LLMTAP_CLICKHOUSE_DATABASE
  value: {{ .Values.clickhouse.database | quote }}
{{- with .Values.clickhouse.passwordSecret.name }}
- name: LLMTAP_CLICKHOUSE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.clickhouse.passwordSecret.key }}
{{- end }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
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
  {{- $env := include "llmtap.env" $root | trim }}
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
      path: /readyz
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
    - name: config
      mountPath: /etc/llmtap
      readOnly: true
    - name: data
      mountPath: {{ include "llmtap.dataDir" $root }}
{{- end }}

{{/* Pod-level settings shared by every workload of the chart. */}}
{{- define "llmtap.podSpecCommon" -}}
serviceAccountName: {{ include "llmtap.serviceAccountName" . }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
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

{{/* Pod annotations: the config's checksum (a changed config rolls the pods) and scraping. */}}
{{- define "llmtap.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.ports.admin | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
