{{/* The agent's configuration file: nodeAgent.config with the Doctor settings of
nodeAgent.doctor. Node name, metrics address/port, kubelet root and Kubernetes mode are
command line flags (see daemonset.yaml). */}}
{{- define "vmha.nodeAgent.config" -}}
{{- $config := deepCopy .Values.nodeAgent.config }}
{{- $doctor := dict }}
{{- with .Values.nodeAgent.doctor.url }}
{{- $_ := set $doctor "url" . }}
{{- end }}
{{- if .Values.nodeAgent.doctor.tokenSecret }}
{{- $_ := set $doctor "token_file" "/etc/vmha/doctor/token" }}
{{- end }}
{{- if $doctor }}
{{- $_ := set $config "doctor" (merge $doctor (get $config "doctor" | default dict)) }}
{{- end }}
{{- if $config }}
{{- toYaml $config }}
{{- else }}
{}
{{- end }}
{{- end }}
