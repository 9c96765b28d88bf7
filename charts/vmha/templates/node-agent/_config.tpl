{{/* The agent's configuration file: nodeAgent.config with the Doctor settings of
nodeAgent.doctor and the messaging settings of `messaging` (the chart's wiring wins over
nodeAgent.config.messaging; its limits and timings are kept). Node name, metrics
address/port, kubelet root and Kubernetes mode are command line flags (see daemonset.yaml);
the agent takes its advertised address ($POD_IP) and namespace ($POD_NAMESPACE) from the
environment. */}}
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
{{- $messaging := dict "enabled" false }}
{{- if include "vmha.messaging" . }}
{{- $tlsDir := include "vmha.messaging.tlsDir" . }}
{{- $messaging = dict
  "enabled" true
  "address" .Values.messaging.address
  "port" (int .Values.messaging.port)
  "tls" (dict
    "ca_file" (printf "%s/ca.crt" $tlsDir)
    "cert_file" (printf "%s/tls.crt" $tlsDir)
    "key_file" (printf "%s/tls.key" $tlsDir))
  "token_file" (printf "%s/token" (include "vmha.messaging.tokenDir" .))
  "token_audience" (include "vmha.messaging.audience" .)
  "agent_service_account" (include "vmha.nodeAgent.serviceAccountName" .)
  "operator_service_account" (include "vmha.operator.serviceAccountName" .) }}
{{- end }}
{{- $_ := set $config "messaging" (merge $messaging (get $config "messaging" | default dict)) }}
{{- toYaml $config }}
{{- end }}
