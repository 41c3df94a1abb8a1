{{/* Names and labels, following `helm create` conventions. */}}
{{- define "adapterhub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name. Kept to 40 characters because KubeRay appends suffixes to the RayService name
(e.g. "-head-svc", "-serve-svc", random cluster suffixes) that must stay within 63.
*/}}
{{- define "adapterhub.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "adapterhub.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "adapterhub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "api"). */}}
{{- define "adapterhub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "adapterhub.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "adapterhub.componentLabels" -}}
{{ include "adapterhub.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "adapterhub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "adapterhub.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference: include with (dict "ctx" $ "image" .Values.ray.worker.image). */}}
{{- define "adapterhub.image" -}}
{{- $repo := default .ctx.Values.image.repository .image.repository }}
{{- $tag := default (default .ctx.Chart.AppVersion .ctx.Values.image.tag) .image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* Secret names: an existing Secret wins over the chart-managed one. */}}
{{- define "adapterhub.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "adapterhub.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "adapterhub.apiKeysKey" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}{{ else }}api-keys{{ end }}
{{- end }}

{{- define "adapterhub.mlflowAuthSecret" -}}
{{- default (printf "%s-mlflow-auth" (include "adapterhub.fullname" .)) .Values.mlflow.auth.existingSecret }}
{{- end }}

{{- define "adapterhub.superlinkTlsSecret" -}}
{{- default (printf "%s-superlink-tls" (include "adapterhub.fullname" .)) .Values.flower.tls.existingSecret }}
{{- end }}

{{- define "adapterhub.mlflowService" -}}
{{- printf "%s-mlflow" (include "adapterhub.fullname" .) }}
{{- end }}

{{/*
The service that carries the gRPC API: KubeRay's head service of the RayService (it maps
every named port of the head container, `grpc` included, and follows the active cluster
during upgrades).
*/}}
{{- define "adapterhub.apiService" -}}
{{- printf "%s-head-svc" (include "adapterhub.fullname" .) }}
{{- end }}

{{- define "adapterhub.superlinkService" -}}
{{- printf "%s-superlink" (include "adapterhub.fullname" .) }}
{{- end }}

{{/* What the tracking server keeps on its own volume (SQLite, artifacts), if anything. */}}
{{- define "adapterhub.mlflowLocalDb" -}}
{{- if not .Values.mlflow.backendStore.existingSecret }}true{{ end }}
{{- end }}

{{- define "adapterhub.mlflowLocalArtifacts" -}}
{{- if not .Values.mlflow.artifacts.destination }}true{{ end }}
{{- end }}

{{- define "adapterhub.mlflowNeedsVolume" -}}
{{- if or (include "adapterhub.mlflowLocalDb" .) (include "adapterhub.mlflowLocalArtifacts" .) }}true{{ end }}
{{- end }}

{{/* The tracking URI every AdapterHub process (API and engines on Ray, ServerApp) logs to. */}}
{{- define "adapterhub.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s:%d" (include "adapterhub.mlflowService" .) (int .Values.mlflow.service.port) }}
{{- else }}
{{- required "mlflow.externalTrackingUri is required when mlflow.enabled is false" .Values.mlflow.externalTrackingUri }}
{{- end }}
{{- end }}

{{/* Environment shared by AdapterHub processes: offline, quiet, and the tracking server. */}}
{{- define "adapterhub.env" -}}
- name: ADAPTERHUB_TRACKING_URI
  value: {{ include "adapterhub.trackingUri" . | quote }}
- name: MLFLOW_TRACKING_URI
  value: {{ include "adapterhub.trackingUri" . | quote }}
{{- if or (and .Values.mlflow.enabled .Values.mlflow.auth.enabled) .Values.mlflow.auth.existingSecret }}
- name: MLFLOW_TRACKING_USERNAME
  value: {{ .Values.mlflow.auth.adminUsername | quote }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "adapterhub.mlflowAuthSecret" . }}
      key: admin-password
{{- end }}
- name: MLFLOW_DISABLE_TELEMETRY
  value: "true"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: HF_HUB_OFFLINE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{- define "adapterhub.podSecurity" -}}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling of one component: include with its values block. */}}
{{- define "adapterhub.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "adapterhub.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
A value kept across upgrades: the existing Secret's key if the release already has it,
otherwise a fresh random string. Include with (dict "ctx" $ "secret" NAME "key" KEY "len" N).
*/}}
{{- define "adapterhub.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret }}
{{- if and $existing (hasKey $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum (int .len) }}
{{- end }}
{{- end }}

{{/* Volumes and mounts of the shared store (sharedStorage), for the Ray pods. */}}
{{- define "adapterhub.sharedVolume" -}}
{{- if .Values.sharedStorage.enabled }}
- name: shared
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-shared" (include "adapterhub.fullname" .)) .Values.sharedStorage.existingClaim }}
{{- end }}
{{- end }}

{{- define "adapterhub.sharedMount" -}}
{{- if .Values.sharedStorage.enabled }}
- {name: shared, mountPath: /shared}
{{- end }}
{{- end }}
