{{/* The name of every object of the release. */}}
{{- define "kreboot.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the agent's pods; never change after install. */}}
{{- define "kreboot.selectorLabels" -}}
app.kubernetes.io/name: kreboot
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "kreboot.labels" -}}
{{ include "kreboot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/part-of: kreboot
{{- end -}}

{{/* The agent's ServiceAccount name. */}}
{{- define "kreboot.serviceAccountName" -}}
{{- include "kreboot.fullname" . -}}
{{- end -}}

{{/* The user name the API server gives the agent's ServiceAccount. */}}
{{- define "kreboot.serviceAccountUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "kreboot.serviceAccountName" . }}
{{- end -}}

{{/* k=v,k2=v2 from a map. */}}
{{- define "kreboot.labelList" -}}
{{- $out := list -}}
{{- range $k, $v := . -}}{{- $out = append $out (printf "%s=%s" $k $v) -}}{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* Where the directory holding the host's sentinel file is mounted in the container. */}}
{{- define "kreboot.sentinelMount" -}}
/host{{ dir .Values.agent.sentinelFile }}
{{- end -}}
