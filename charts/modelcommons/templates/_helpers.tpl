{{/* ---- names ------------------------------------------------------------------------------ */}}

{{- define "modelcommons.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "modelcommons.fullname" -}}
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

{{/* A component's resource name; 40 characters leave room for KubeRay's suffixes. */}}
{{- define "modelcommons.componentName" -}}
{{- printf "%s-%s" (include "modelcommons.fullname" .root | trunc 40 | trimSuffix "-") .component }}
{{- end }}

{{- define "modelcommons.mlflow.name" -}}{{ include "modelcommons.componentName" (dict "root" . "component" "mlflow") }}{{- end }}
{{- define "modelcommons.postgresql.name" -}}{{ include "modelcommons.componentName" (dict "root" . "component" "postgresql") }}{{- end }}
{{- define "modelcommons.minio.name" -}}{{ include "modelcommons.componentName" (dict "root" . "component" "minio") }}{{- end }}
{{- define "modelcommons.serving.name" -}}{{ include "modelcommons.componentName" (dict "root" . "component" "serving") }}{{- end }}
{{/* KubeRay names the RayService's serve Service <rayservice>-serve-svc and labels it ray.io/serve=<rayservice>-serve. */}}
{{- define "modelcommons.serving.serveService" -}}{{ include "modelcommons.serving.name" . }}-serve-svc{{- end }}

{{- define "modelcommons.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* ---- labels ----------------------------------------------------------------------------- */}}

{{- define "modelcommons.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelcommons.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Call with (dict "root" $ "component" "mlflow"). */}}
{{- define "modelcommons.labels" -}}
helm.sh/chart: {{ include "modelcommons.chart" .root }}
{{ include "modelcommons.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: modelcommons
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select every pod of this release (NetworkPolicies). */}}
{{- define "modelcommons.releaseSelector" -}}
app.kubernetes.io/name: {{ include "modelcommons.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ---- images ----------------------------------------------------------------------------- */}}

{{- define "modelcommons.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "modelcommons.mlflow.image" -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.mlflow.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.mlflow.image.tag) }}
{{- end }}

{{- define "modelcommons.worker.image" -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.serving.worker.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.serving.worker.image.tag) }}
{{- end }}

{{- define "modelcommons.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modelcommons.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modelcommons.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* ---- secrets ---------------------------------------------------------------------------- */}}

{{- define "modelcommons.s3.secretName" -}}
{{- if .Values.s3.existingSecret }}{{ .Values.s3.existingSecret }}{{ else }}{{ include "modelcommons.fullname" . }}-s3{{ end }}
{{- end }}

{{/* Namespace of the Kubeflow Pipelines task pods: where their ConfigMap and Secret must live. */}}
{{- define "modelcommons.pipelineEnv.namespace" -}}
{{- default .Release.Namespace .Values.pipelineEnv.namespace }}
{{- end }}

{{/* Secret the task pods read the S3 keys from (`--env-secret` when it differs from pipelineEnv.name). */}}
{{- define "modelcommons.pipelineEnv.secretName" -}}
{{- default .Values.pipelineEnv.name .Values.pipelineEnv.existingSecret }}
{{- end }}

{{- define "modelcommons.postgresql.secretName" -}}
{{- if not .Values.postgresql.enabled }}{{ .Values.externalDatabase.existingSecret }}
{{- else if .Values.postgresql.auth.existingSecret }}{{ .Values.postgresql.auth.existingSecret }}
{{- else }}{{ include "modelcommons.fullname" . }}-postgresql{{ end }}
{{- end }}

{{- define "modelcommons.postgresql.passwordKey" -}}
{{- if .Values.postgresql.enabled }}{{ .Values.postgresql.auth.passwordKey }}{{ else }}{{ .Values.externalDatabase.passwordKey }}{{ end }}
{{- end }}

{{/*
A secret value for a chart-made Secret: the plaintext value when given, else the value already in
the cluster's Secret (so upgrades keep passwords), else a generated one. Refused in production.
Call with (dict "root" $ "secret" NAME "key" KEY "value" VALUE "field" "s3.accessKey").
*/}}
{{- define "modelcommons.secretValue" -}}
{{- if .root.Values.secrets.requireExisting }}
{{- fail (printf "%s: secrets.requireExisting is true, so the chart creates no Secret; set the matching existingSecret" .field) }}
{{- end }}
{{- if .value }}
{{- .value | b64enc }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret }}
{{- if and $existing (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- randAlphaNum 32 | b64enc }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---- connection settings ---------------------------------------------------------------- */}}

{{- define "modelcommons.s3.endpoint" -}}
{{- if .Values.minio.enabled }}{{ include "modelcommons.minio.name" . }}.{{ .Release.Namespace }}.svc:9000
{{- else }}{{ required "s3.endpoint (host:port) is required when minio.enabled is false" .Values.s3.endpoint }}{{ end }}
{{- end }}

{{- define "modelcommons.s3.secure" -}}
{{- if .Values.minio.enabled }}false{{ else }}{{ .Values.s3.secure }}{{ end }}
{{- end }}

{{- define "modelcommons.s3.url" -}}
{{- if eq (include "modelcommons.s3.secure" .) "true" }}https{{ else }}http{{ end }}://{{ include "modelcommons.s3.endpoint" . }}
{{- end }}

{{- define "modelcommons.mlflow.url" -}}
http://{{ include "modelcommons.mlflow.name" . }}.{{ .Release.Namespace }}.svc:5000
{{- end }}

{{/* Environment of every project-image container that talks to MLflow and S3 (MODELCOMMONS_* settings). */}}
{{- define "modelcommons.appEnv" -}}
- name: HOME
  value: /tmp/home
- name: MODELCOMMONS_HOME
  value: /tmp/modelcommons
- name: MLFLOW_TRACKING_URI
  value: {{ include "modelcommons.mlflow.url" . | quote }}
- name: MODELCOMMONS_S3_ENDPOINT
  value: {{ include "modelcommons.s3.endpoint" . | quote }}
- name: MODELCOMMONS_S3_SECURE
  value: {{ include "modelcommons.s3.secure" . | quote }}
- name: MODELCOMMONS_S3_REGION
  value: {{ .Values.s3.region | quote }}
- name: MODELCOMMONS_S3_BUCKET
  value: {{ .Values.s3.bucket | quote }}
- name: MODELCOMMONS_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "modelcommons.s3.secretName" . }}
      key: {{ .Values.s3.accessKeyKey }}
- name: MODELCOMMONS_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "modelcommons.s3.secretName" . }}
      key: {{ .Values.s3.secretKeyKey }}
{{- end }}

{{/* Ray Serve's high-throughput mode on the Ray pods (Ray >= 2.55, KubeRay guide "Enable High
Throughput on Ray Serve"): HAProxy hands requests, body included, to the ingress replica, and replicas
call each other over direct gRPC. serving.server.HIGH_THROUGHPUT_ENV is the local equivalent. */}}
{{- define "modelcommons.rayServeEnv" -}}
{{- if .Values.serving.highThroughput }}
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
{{- end }}
{{- end }}

{{/* emptyDir scratch space: the root filesystem is read-only. */}}
{{- define "modelcommons.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
{{- end }}

{{/*
serveConfigV2: the document serving.app.serve_config(ServeArgs(**.Values.serving.app)) returns, so
`modelcommons serve --print-config` and the RayService run the same application. Numbers are cast
to the ServeArgs field types so that large integers never render in exponent form.
*/}}
{{- define "modelcommons.serveConfig" -}}
{{- $a := .Values.serving.app }}
{{- $args := dict
  "model_uri" $a.model_uri
  "segmenter_model_uri" $a.segmenter_model_uri
  "embedding_cache_bytes" (int64 $a.embedding_cache_bytes)
  "segmenter_num_cpus" (float64 $a.segmenter_num_cpus)
  "num_cpus" (float64 $a.num_cpus)
  "num_gpus" (float64 $a.num_gpus)
  "replicas" (int $a.replicas)
  "max_batch_size" (int $a.max_batch_size)
  "batch_wait_timeout_s" (float64 $a.batch_wait_timeout_s)
  "score_threshold" (float64 $a.score_threshold)
  "iou_threshold" (float64 $a.iou_threshold)
  "max_detections" (int $a.max_detections)
  "max_image_bytes" (int64 $a.max_image_bytes)
  "max_image_pixels" (int64 $a.max_image_pixels)
  "ingress_num_cpus" (float64 $a.ingress_num_cpus)
  "max_ongoing_requests" (int $a.max_ongoing_requests)
  "int8_model_uri" $a.int8_model_uri
  "inspector_max_sessions" (int $a.inspector_max_sessions)
  "inspector_max_bytes" (int64 $a.inspector_max_bytes)
  "inspector_ttl_s" (float64 $a.inspector_ttl_s)
  "inspector_num_cpus" (float64 $a.inspector_num_cpus)
  "inspector_max_edit_bytes" (int64 $a.inspector_max_edit_bytes)
}}
{{- $app := dict "name" "modelcommons" "route_prefix" "/" "import_path" "serving.app:app_builder" "args" $args }}
{{- $cfg := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" $a.host "port" (int $a.port))
  "applications" (list $app)
}}
{{- toYaml $cfg }}
{{- end }}

{{/* ---- NetworkPolicy peers ---------------------------------------------------------------- */}}
{{- /* A peer: this release's pods of one component. */}}
{{- define "modelcommons.np.peer" -}}
- podSelector:
    matchLabels:
      {{- include "modelcommons.selectorLabels" . | nindent 6 }}
{{- end }}
{{- /* Egress to S3: the bundled MinIO, or the external endpoint's port on externalTo. */}}
{{- define "modelcommons.np.s3Egress" -}}
{{- if .Values.minio.enabled }}
- to:
    {{- include "modelcommons.np.peer" (dict "root" . "component" "minio") | nindent 4 }}
  ports:
    - port: 9000
      protocol: TCP
{{- else }}
- to:
    {{- toYaml .Values.networkPolicy.externalTo | nindent 4 }}
  ports:
    - port: {{ (splitList ":" .Values.s3.endpoint | last) | default (ternary "443" "80" .Values.s3.secure) | int }}
      protocol: TCP
{{- end }}
{{- end }}

{{/* ---- checks that the schema cannot express ----------------------------------------------- */}}
{{- define "modelcommons.validate" -}}
{{- if and .Values.serving.enabled (not .Values.serving.worker.gpu.enabled) (gt (float64 .Values.serving.app.num_gpus) 0.0) }}
{{- fail (printf "serving.app.num_gpus is %v but serving.worker.gpu.enabled is false: replicas would never be scheduled; set num_gpus to 0 for a CPU-only install" .Values.serving.app.num_gpus) }}
{{- end }}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.host) }}
{{- fail "externalDatabase.host is required when postgresql.enabled is false" }}
{{- end }}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.existingSecret) }}
{{- fail "externalDatabase.existingSecret is required when postgresql.enabled is false (the Secret holding the database password)" }}
{{- end }}
{{- if .Values.secrets.requireExisting }}
{{- if not .Values.s3.existingSecret }}
{{- fail "s3.existingSecret is required when secrets.requireExisting is true (a Secret with the S3 access and secret keys)" }}
{{- end }}
{{- if and .Values.postgresql.enabled (not .Values.postgresql.auth.existingSecret) }}
{{- fail "postgresql.auth.existingSecret is required when secrets.requireExisting is true (a Secret with the database password)" }}
{{- end }}
{{- range $field, $v := dict "s3.accessKey" .Values.s3.accessKey "s3.secretKey" .Values.s3.secretKey "postgresql.auth.password" .Values.postgresql.auth.password }}
{{- if $v }}
{{- fail (printf "%s must be empty when secrets.requireExisting is true: put it in the existing Secret instead" $field) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.pipelineEnv.enabled .Values.s3.existingSecret (not .Values.pipelineEnv.existingSecret) }}
{{- fail (printf "pipelineEnv.existingSecret is required when s3.existingSecret is set (the chart does not copy a Secret it did not make): a Secret in namespace %s with keys MODELCOMMONS_S3_ACCESS_KEY and MODELCOMMONS_S3_SECRET_KEY for the pipeline task pods, or pipelineEnv.enabled=false" (include "modelcommons.pipelineEnv.namespace" .)) }}
{{- end }}
{{- if and .Values.pipelineUpload.enabled (not .Values.pipelineUpload.host) }}
{{- fail "pipelineUpload.host (the Kubeflow Pipelines API URL) is required when pipelineUpload.enabled is true" }}
{{- end }}
{{- end }}
