{{/* Chart name. */}}
{{- define "forgeline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-forgeline, or the release name if it already says forgeline. */}}
{{- define "forgeline.fullname" -}}
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

{{- define "forgeline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "forgeline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "forgeline.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "forgeline.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: forgeline
{{- end }}

{{- define "forgeline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "forgeline.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespaces the operator watches, as a list (namespaces scope defaults to the release's). */}}
{{- define "forgeline.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else if eq .Values.rbac.scope "namespaces" }}
{{- toJson (list .Release.Namespace) }}
{{- else }}
{{- toJson (list) }}
{{- end }}
{{- end }}

{{/* Rules for the jobs' namespaces: what the operator reads and writes next to a job. */}}
{{- define "forgeline.namespacedRules" -}}
# The jobs: kopf watches them, patches status/finalizers; TTL cleanup deletes finished ones.
- apiGroups: ["forgeline.dev"]
  resources: ["trainingjobs", "finetunejobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["forgeline.dev"]
  resources: ["trainingjobs/status", "finetunejobs/status"]
  verbs: ["get", "patch"]
# One RayCluster per job (KubeRay turns it into pods); owned by the job.
- apiGroups: ["ray.io"]
  resources: ["rayclusters"]
  verbs: ["get", "create", "delete"]
# A finished job's Ray pods, deleted with a short grace period before its RayCluster (KubeRay's
# init container ignores SIGTERM, so they would hold their node for their whole grace period).
# Only deletecollection, by the cluster's labels: no get, list, create, exec or logs.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["deletecollection"]
# The per-job Ray auth token Secret: created, read back, deleted. No list/watch.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "delete"]
# Phase transitions and handler errors are posted as Events on the job.
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
