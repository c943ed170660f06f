{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "qaq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name: the release name, or release-chart. */}}
{{- define "qaq.fullname" -}}
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

{{- define "qaq.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "qaq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "qaq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qaq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "qaq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "qaq.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "qaq.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* API keys: a Secret of the chart's, or an existing one; empty when off. */}}
{{- define "qaq.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.keys -}}
{{- printf "%s-api-keys" (include "qaq.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Registration secret: a Secret of the chart's, or an existing one; empty when off. */}}
{{- define "qaq.registrationSecret" -}}
{{- if .Values.registration.existingSecret -}}
{{- .Values.registration.existingSecret -}}
{{- else if .Values.registration.secret -}}
{{- printf "%s-registration" (include "qaq.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "qaq.registrationEnv" -}}
{{- if include "qaq.registrationSecret" . -}}
- name: QAQ_REGISTRATION_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "qaq.registrationSecret" . }}
      key: registration-secret
{{- end -}}
{{- end -}}
