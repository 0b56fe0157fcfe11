{{/* Chart name (nameOverride). */}}
{{- define "gpu-dra.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: the release name if it contains the chart name. */}}
{{- define "gpu-dra.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "gpu-dra.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of the plugin's DaemonSet, ServiceAccount and ClusterRole. */}}
{{- define "gpu-dra.pluginName" -}}
{{- printf "%s-kubelet-plugin" (include "gpu-dra.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of the webhook's Deployment, Service and configuration. */}}
{{- define "gpu-dra.webhookName" -}}
{{- printf "%s-webhook" (include "gpu-dra.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Secret with the webhook's serving certificate. */}}
{{- define "gpu-dra.webhookSecret" -}}
{{- default (printf "%s-tls" (include "gpu-dra.webhookName" .)) .Values.webhook.tls.secretName -}}
{{- end -}}

{{/* Domain of the DeviceClass names: the driver name without its first label. */}}
{{- define "gpu-dra.classDomain" -}}
{{- regexReplaceAll "^[^.]+\\." .Values.driverName "" -}}
{{- end -}}

{{/* Image reference; the tag defaults to the chart's appVersion. */}}
{{- define "gpu-dra.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "gpu-dra.labels" -}}
app.kubernetes.io/part-of: {{ include "gpu-dra.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* CEL selector of the devices of one type attribute ("gpu" or "mig") of our driver. */}}
{{- define "gpu-dra.deviceSelector" -}}
- cel:
    expression: >-
      device.driver == '{{ .driver }}' &&
      device.attributes['{{ .driver }}'].type == '{{ .type }}'
{{- end -}}
