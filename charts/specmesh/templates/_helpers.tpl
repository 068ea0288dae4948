{{/*
Shared definitions. A service of the chart is a values block (.Values.<name>) plus a name in
"specmesh.components" plus its command line in "specmesh.args.<name>"; every per-service template
(Deployment, headless Service, HPA, PodDisruptionBudget, ServiceAccount, NetworkPolicy) ranges
over the components, so a new service needs those three things and nothing else. A service
that can be switched off (scoring.enabled, imagegen.enabled) is left out of the list when off.
The image service's block is `imagegen` (its component name too): `.Values.image` holds the
container images.
*/}}

{{- define "specmesh.components" -}}
target draft {{ if .Values.scoring.enabled }}scoring {{ end }}{{ if .Values.imagegen.enabled }}imagegen {{ end }}gateway
{{- end -}}

{{/* The components only the gateway may call (it relays their gRPC services), space-separated. */}}
{{- define "specmesh.gatewayOnly" -}}
{{- $names := list -}}
{{- if .Values.scoring.enabled }}{{ $names = append $names "scoring" }}{{ end -}}
{{- if .Values.imagegen.enabled }}{{ $names = append $names "imagegen" }}{{ end -}}
{{- join " " $names -}}
{{- end -}}

{{/* The gRPC service each server registers: the health entry its probes ask for. */}}
{{- define "specmesh.grpcService" -}}
{{- get (dict "target" "specmesh.v1.TargetService" "draft" "specmesh.v1.DraftService" "scoring" "specmesh.v1.ScoringService" "imagegen" "specmesh.v1.ImageService" "gateway" "specmesh.v1.Gateway") . -}}
{{- end -}}

{{/* The services that load models (mount the model volume, use the services image). */}}
{{- define "specmesh.isModelService" -}}
{{- if has . (list "target" "draft" "scoring" "imagegen") -}}true{{- end -}}
{{- end -}}

{{/* A model as a path: a name is a directory of /models, an absolute path is used as it is. */}}
{{- define "specmesh.modelPath" -}}
{{- ternary . (printf "/models/%s" .) (hasPrefix "/" .) -}}
{{- end -}}

{{/* The models a model service loads (its pods wait for each to be in the volume), as paths. */}}
{{- define "specmesh.modelPaths" -}}
{{- $v := index .root.Values .name -}}
{{- $models := list $v.model -}}
{{- if and (eq .name "scoring") $v.observer -}}
{{- $models = append $models $v.observer -}}
{{- end -}}
{{- range $models }}
- {{ include "specmesh.modelPath" . | quote }}
{{- end -}}
{{- end -}}

{{- define "specmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "specmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's objects (its Deployment, headless Service ...): <fullname>-<component>. */}}
{{- define "specmesh.componentName" -}}
{{- printf "%s-%s" (include "specmesh.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "specmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specmesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "specmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "specmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: specmesh
{{- end -}}

{{- define "specmesh.serviceAccountName" -}}
{{- $sa := (index .root.Values .name).serviceAccount -}}
{{- if $sa.create -}}{{ default (include "specmesh.componentName" .) $sa.name }}{{- else -}}{{ default "default" $sa.name }}{{- end -}}
{{- end -}}

{{- define "specmesh.image" -}}
{{- $img := .root.Values.image -}}
{{- if eq .name "gateway" -}}
{{- printf "%s%s:%s" $img.registry $img.gateway.repository (default .root.Chart.AppVersion $img.gateway.tag) -}}
{{- else -}}
{{- printf "%s%s:%s" $img.registry $img.services.repository (default (printf "%s-%s" .root.Chart.AppVersion $img.torchVariant) $img.services.tag) -}}
{{- end -}}
{{- end -}}

{{/* host:port of a component's headless Service: every ready replica's address (the gateway's
pools resolve it and re-resolve it every 30 s). */}}
{{- define "specmesh.address" -}}
{{- printf "%s:%v" (include "specmesh.componentName" .) (index .root.Values .name).port -}}
{{- end -}}

{{/* --- command lines (`specmesh` is the images' entry point) --- */}}

{{- define "specmesh.args.target" -}}
{{- $v := .root.Values.target -}}
- serve
- target
- --model
- {{ $v.model | quote }}
- --port
- {{ $v.port | quote }}
{{- if $v.threads }}
- --threads
- {{ $v.threads | quote }}
{{- end }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "specmesh.args.draft" -}}
{{- $v := .root.Values.draft -}}
- serve
- draft
- --model
- {{ $v.model | quote }}
- --port
- {{ $v.port | quote }}
{{- if $v.threads }}
- --threads
- {{ $v.threads | quote }}
{{- end }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "specmesh.args.scoring" -}}
{{- $v := .root.Values.scoring -}}
- serve
- scoring
- --model
- {{ $v.model | quote }}
{{- if $v.observer }}
- --observer
- {{ $v.observer | quote }}
{{- end }}
- --port
- {{ $v.port | quote }}
{{- if $v.threads }}
- --threads
- {{ $v.threads | quote }}
{{- end }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "specmesh.args.imagegen" -}}
{{- $v := .root.Values.imagegen -}}
- serve
- image
- --model-dir
- {{ include "specmesh.modelPath" $v.model | quote }}
- --port
- {{ $v.port | quote }}
{{- if $v.threads }}
- --threads
- {{ $v.threads | quote }}
{{- end }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "specmesh.args.gateway" -}}
{{- $v := .root.Values.gateway -}}
- serve
- gateway
- --target
- {{ include "specmesh.address" (dict "root" .root "name" "target") | quote }}
- --draft
- {{ include "specmesh.address" (dict "root" .root "name" "draft") | quote }}
{{- if .root.Values.scoring.enabled }}
- --scoring
- {{ include "specmesh.address" (dict "root" .root "name" "scoring") | quote }}
{{- end }}
{{- if .root.Values.imagegen.enabled }}
- --image
- {{ include "specmesh.address" (dict "root" .root "name" "imagegen") | quote }}
{{- end }}
- --port
- {{ $v.port | quote }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* A Job that builds models into the volume (model-init, image-init): .root, .name (its
component and container), .args (its command line), .job (resources, nodeSelector, tolerations).
Not a Helm hook: post-install hooks run only after `helm install --wait` sees the pods ready, and
those wait for these jobs. One Job per revision (a Job's spec is immutable), removed an hour after
it finishes. */}}
{{- define "specmesh.modelJob" -}}
{{- $ctx := dict "root" .root "name" .name -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "specmesh.componentName" $ctx }}-{{ .root.Release.Revision }}
  labels:
    {{- include "specmesh.labels" $ctx | nindent 4 }}
spec:
  backoffLimit: 2
  ttlSecondsAfterFinished: 3600
  template:
    metadata:
      labels:
        {{- include "specmesh.labels" $ctx | nindent 8 }}
    spec:
      restartPolicy: OnFailure
      automountServiceAccountToken: false
      securityContext:
        {{- toYaml .root.Values.podSecurityContext | nindent 8 }}
      {{- with .root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "specmesh.image" (dict "root" .root "name" "target") }}
          imagePullPolicy: {{ .root.Values.image.pullPolicy }}
          args: {{ toJson .args }}
          env:
            - {name: SPECMESH_MODEL_DIR, value: /models}
          volumeMounts:
            - {name: models, mountPath: /models}
          resources:
            {{- toYaml .job.resources | nindent 12 }}
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL]}
      volumes:
        - name: models
          persistentVolumeClaim:
            claimName: {{ default (printf "%s-models" (include "specmesh.fullname" .root)) .root.Values.models.persistence.existingClaim }}
      {{- with .job.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .job.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{/* --- environment --- */}}

{{- define "specmesh.redisSecretName" -}}
{{- default (printf "%s-redis" (include "specmesh.fullname" .)) .Values.redis.existingSecret -}}
{{- end -}}

{{/* Environment of every specmesh container: the same variables `specmesh up` gives its
children (SPECMESH_REDIS_URL, GOMP_SPINCOUNT), servers on every interface, and OTel and the
Prometheus endpoint only when on. */}}
{{- define "specmesh.env" -}}
- name: SPECMESH_HOST
  value: "0.0.0.0"
- name: GOMP_SPINCOUNT
  value: "10000"
{{- if .root.Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "specmesh.redisSecretName" .root }}
      key: password
- name: SPECMESH_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/0" (include "specmesh.fullname" .root) | quote }}
{{- else if .root.Values.redis.externalUrl }}
- name: SPECMESH_REDIS_URL
  value: {{ .root.Values.redis.externalUrl | quote }}
{{- end }}
{{- if .root.Values.otel.enabled }}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_METRICS_EXPORTER
  value: otlp
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ default (printf "http://%s-otel-collector:4317" (include "specmesh.fullname" .root)) .root.Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: grpc
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),service.instance.id=$(POD_NAME)"
{{- end }}
{{- if .root.Values.metrics.enabled }}
- name: SPECMESH_METRICS_PORT
  value: {{ .root.Values.metrics.port | quote }}
{{- end }}
{{- if include "specmesh.isModelService" .name }}
- name: SPECMESH_MODEL_DIR
  value: /models
{{- end }}
{{- range $key, $value := (index .root.Values .name).env }}
- name: {{ $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}
