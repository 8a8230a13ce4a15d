{{/*
Names, labels and the values the application's settings are derived from.
*/}}

{{- define "instructrec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every object (truncated so that "<fullname>-worker-headless" and friends stay within
the 63-character DNS label limit).
*/}}
{{- define "instructrec.fullname" -}}
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

{{- define "instructrec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "instructrec.labels" -}}
helm.sh/chart: {{ include "instructrec.chart" . }}
app.kubernetes.io/name: {{ include "instructrec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: instructrec-stream
{{- end }}

{{/* Selector labels of one component: (dict "context" $ "component" "worker"). */}}
{{- define "instructrec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "instructrec.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects: (dict "context" $ "component" "worker"). */}}
{{- define "instructrec.componentLabels" -}}
{{ include "instructrec.labels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "instructrec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "instructrec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "instructrec.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "instructrec.finetuneImage" -}}
{{- $image := .Values.finetune.image }}
{{- if $image.repository }}
{{- printf "%s:%s" $image.repository (default (default .Chart.AppVersion .Values.image.tag) $image.tag) }}
{{- else }}
{{- include "instructrec.image" . }}
{{- end }}
{{- end }}

{{- define "instructrec.configMapName" -}}
{{- printf "%s-config" (include "instructrec.fullname" .) }}
{{- end }}

{{- define "instructrec.workerName" -}}
{{- printf "%s-worker" (include "instructrec.fullname" .) }}
{{- end }}

{{/* The headless Service that gives every worker pod a stable DNS name (its canonical URL). */}}
{{- define "instructrec.workerHeadlessName" -}}
{{- printf "%s-worker-headless" (include "instructrec.fullname" .) }}
{{- end }}

{{- define "instructrec.tritonName" -}}
{{- printf "%s-triton" (include "instructrec.fullname" .) }}
{{- end }}

{{- define "instructrec.tritonRepositoryClaim" -}}
{{- default (printf "%s-triton-models" (include "instructrec.fullname" .)) .Values.triton.modelRepository.persistence.existingClaim }}
{{- end }}

{{/*
The model repository: a folder of the claim's volume (mounted at mountPath), so that the staging folder
beside it (instructrec.adapters.triton.repository.staging_dir) is on the same volume. The same path in every
pod that mounts the claim.
*/}}
{{- define "instructrec.tritonRepository" -}}
{{- $m := .Values.triton.modelRepository }}
{{- printf "%s/%s" ($m.mountPath | trimSuffix "/") $m.directory }}
{{- end }}

{{- define "instructrec.finetuneName" -}}
{{- printf "%s-finetune" (include "instructrec.fullname" .) }}
{{- end }}

{{- define "instructrec.finetuneStoreClaim" -}}
{{- printf "%s-finetune-store" (include "instructrec.fullname" .) }}
{{- end }}

{{- define "instructrec.qdrantName" -}}
{{- printf "%s-qdrant" (include "instructrec.fullname" .) }}
{{- end }}

{{/* The Qdrant URL the application uses: the in-chart server, or the external one (required then). */}}
{{- define "instructrec.qdrantUrl" -}}
{{- if .Values.qdrant.enabled }}
{{- printf "http://%s:6333" (include "instructrec.qdrantName" .) }}
{{- else }}
{{- required "qdrant.url is required when qdrant.enabled is false (an external Qdrant server)" .Values.qdrant.url }}
{{- end }}
{{- end }}

{{/* The Triton endpoint the worker calls: the in-chart service's gRPC or HTTP port, or an external one. */}}
{{- define "instructrec.tritonUrl" -}}
{{- if .Values.triton.enabled }}
{{- printf "%s:%d" (include "instructrec.tritonName" .) (ternary 8001 8000 (eq .Values.triton.protocol "grpc") | int) }}
{{- else }}
{{- required "triton.externalUrl is required when triton.enabled is false (host:port of a Triton server)" .Values.triton.externalUrl }}
{{- end }}
{{- end }}

{{/* Paths inside the application pods. */}}
{{- define "instructrec.varDir" -}}/var/lib/instructrec{{- end }}
{{- define "instructrec.finetuneDir" -}}/var/lib/instructrec/finetune{{- end }}
{{- define "instructrec.kafkaTlsDir" -}}/etc/instructrec/kafka-tls{{- end }}

{{/*
The non-secret INSTRUCTREC_* settings, as a YAML map (the ConfigMap's data). The chart owns the keys it
derives; `settings` adds the rest and may not override them.
*/}}
{{- define "instructrec.settings" -}}
{{- $env := dict }}
{{- $var := include "instructrec.varDir" . }}
{{- $_ := set $env "STATE_DIR" (printf "%s/state" $var) }}
{{- $_ := set $env "DATA_ROOT" "/data" }}
{{- $k := .Values.kafka }}
{{- $_ := set $env "KAFKA__BROKER" (required "kafka.broker is required (an external Kafka cluster)" $k.broker) }}
{{- $_ := set $env "KAFKA__PARTITIONS" ($k.partitions | toString) }}
{{- $_ := set $env "KAFKA__REPLICATION_FACTOR" ($k.replicationFactor | toString) }}
{{- $_ := set $env "KAFKA__REQUEST_TIMEOUT_S" ($k.requestTimeoutSeconds | toString) }}
{{- $_ := set $env "KAFKA__SECURITY_PROTOCOL" $k.securityProtocol }}
{{- if hasPrefix "SASL" $k.securityProtocol }}
{{- $_ := required (printf "kafka.sasl.existingSecret is required with kafka.securityProtocol=%s" $k.securityProtocol) $k.sasl.existingSecret }}
{{- $_ := set $env "KAFKA__SASL_MECHANISM" $k.sasl.mechanism }}
{{- end }}
{{- if and (hasSuffix "SSL" $k.securityProtocol) $k.tls.existingSecret }}
{{- $tls := include "instructrec.kafkaTlsDir" . }}
{{- if $k.tls.caKey }}
{{- $_ := set $env "KAFKA__SSL_CAFILE" (printf "%s/%s" $tls $k.tls.caKey) }}
{{- end }}
{{- if $k.tls.certKey }}
{{- $_ := set $env "KAFKA__SSL_CERTFILE" (printf "%s/%s" $tls $k.tls.certKey) }}
{{- end }}
{{- if $k.tls.keyKey }}
{{- $_ := set $env "KAFKA__SSL_KEYFILE" (printf "%s/%s" $tls $k.tls.keyKey) }}
{{- end }}
{{- end }}
{{- range $role, $topic := $k.topics }}
{{- $_ := set $env (printf "KAFKA__TOPICS__%s" ($role | snakecase | upper)) $topic }}
{{- end }}
{{- $_ := set $env "QDRANT__URL" (include "instructrec.qdrantUrl" .) }}
{{- $_ := set $env "QDRANT__COLLECTION" .Values.qdrant.collection }}
{{- $_ := set $env "TRITON__URL" (include "instructrec.tritonUrl" .) }}
{{- $_ := set $env "TRITON__PROTOCOL" .Values.triton.protocol }}
{{- $_ := set $env "TRITON__RERANKER_MODEL" .Values.triton.rerankerModel }}
{{- $_ := set $env "TRITON__TIMEOUT_S" (.Values.triton.timeoutSeconds | toString) }}
{{- $_ := set $env "TRITON__RETRIES" (.Values.triton.retries | toString) }}
{{- $_ := set $env "MODEL__ARTIFACTS" "/artifacts" }}
{{- $_ := set $env "WEB__HOST" "0.0.0.0" }}
{{- $_ := set $env "WEB__PORT" (.Values.worker.webPort | toString) }}
{{- $_ := set $env "STREAM__STORE" "rocksdb" }}
{{- $_ := set $env "STREAM__DATA_DIR" (printf "%s/faust" $var) }}
{{- if .Values.finetune.enabled }}
{{- $_ := set $env "TRITON__REPOSITORY" (include "instructrec.tritonRepository" .) }}
{{- $_ := set $env "FINETUNE__STORE" (printf "%s/examples.db" (include "instructrec.finetuneDir" .)) }}
{{- range $key, $value := .Values.finetune.settings }}
{{- /* whole numbers without a fraction or an exponent: values arrive as float64 */ -}}
{{- $text := ternary (int64 $value | toString) (toString $value) (and (kindIs "float64" $value) (eq (float64 (int64 $value)) $value)) }}
{{- $_ := set $env (printf "FINETUNE__%s" ($key | upper)) $text }}
{{- end }}
{{- end }}
{{- range $key, $value := .Values.settings }}
{{- $name := $key | upper | trimPrefix "INSTRUCTREC_" }}
{{- if or (hasKey $env $name) (hasPrefix "KAFKA__" $name) (hasPrefix "INFRA__" $name) (eq $name "STREAM__CANONICAL_URL") (eq $name "QDRANT__API_KEY") (eq $name "TRITON__REPOSITORY") (eq $name "FINETUNE__STORE") }}
{{- fail (printf "settings.%s: the chart sets INSTRUCTREC_%s itself (see values.yaml: kafka, qdrant, triton, worker, finetune)" $key $name) }}
{{- end }}
{{- $_ := set $env $name ($value | toString) }}
{{- end }}
{{- range $name := keys $env | sortAlpha }}
{{ printf "INSTRUCTREC_%s" $name }}: {{ get $env $name | quote }}
{{- end }}
{{- end }}

{{/*
Environment of every application container beside the ConfigMap: secrets by reference, Hugging Face
offline mode, writable home and caches.
*/}}
{{- define "instructrec.appEnv" -}}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/huggingface
{{- if .Values.huggingFaceOffline }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- end }}
{{- if hasPrefix "SASL" .Values.kafka.securityProtocol }}
- name: INSTRUCTREC_KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.usernameKey }}
- name: INSTRUCTREC_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
{{- if .Values.qdrant.apiKey.existingSecret }}
- name: INSTRUCTREC_QDRANT__API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.qdrant.apiKey.existingSecret }}
      key: {{ .Values.qdrant.apiKey.key }}
{{- end }}
{{- end }}

{{/* Volumes every application pod has: the Kafka TLS secret (when configured) and /tmp. */}}
{{- define "instructrec.appVolumes" -}}
- name: tmp
  emptyDir: {}
{{- if and (hasSuffix "SSL" .Values.kafka.securityProtocol) .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "instructrec.appVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and (hasSuffix "SSL" .Values.kafka.securityProtocol) .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  mountPath: {{ include "instructrec.kafkaTlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Pod annotations that roll the pods when the ConfigMap changes. */}}
{{- define "instructrec.configChecksum" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}
