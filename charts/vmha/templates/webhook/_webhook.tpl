{{/* One entry of a webhook configuration's `webhooks` (Webhook.configuration_entry in
vmha_operator.webhooks). Arguments: root, caBundle, id, group, version, resource, operations,
members (only objects carrying the group label), votes (the webhook asks guests to vote: a
side effect, skipped on dry runs). */}}
{{- define "vmha.webhook.entry" -}}
{{- $root := .root -}}
- name: {{ .id }}.vmha.io
  admissionReviewVersions: [v1]
  sideEffects: {{ if .votes }}NoneOnDryRun{{ else }}None{{ end }}
  failurePolicy: Fail
  matchPolicy: Equivalent
  timeoutSeconds: 10
  clientConfig:
    service:
      name: {{ include "vmha.webhook.serviceName" $root }}
      namespace: {{ $root.Release.Namespace }}
      path: /{{ .id }}
    {{- with .caBundle }}
    caBundle: {{ . }}
    {{- end }}
  rules:
    - apiGroups: [{{ .group | quote }}]
      apiVersions: [{{ .version | quote }}]
      resources: [{{ .resource | quote }}]
      operations: {{ toJson .operations }}
      scope: Namespaced
  {{- if .members }}
  # On UPDATE the apiserver matches the old or the new object: a VM leaving its group is seen.
  objectSelector:
    matchExpressions:
      - key: vmha.io/group
        operator: Exists
  {{- end }}
  {{- with include "vmha.webhook.namespaceSelector" $root }}
  namespaceSelector:
    {{- . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* cert-manager's CA injector fills in the caBundle from the serving Certificate. */}}
{{- define "vmha.webhook.annotations" -}}
{{- if .Values.webhook.certManager.enabled -}}
annotations:
  cert-manager.io/inject-ca-from: {{ .Release.Namespace }}/{{ include "vmha.fullname" . }}-webhook
{{- end }}
{{- end }}
