{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "vmha.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>`, or the release name alone when it already contains the chart name. */}}
{{- define "vmha.fullname" -}}
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

{{- define "vmha.operator.name" -}}
{{- printf "%s-operator" (include "vmha.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vmha.nodeAgent.name" -}}
{{- printf "%s-node-agent" (include "vmha.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vmha.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "vmha.operator.name" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vmha.nodeAgent.serviceAccountName" -}}
{{- if .Values.nodeAgent.serviceAccount.create }}
{{- default (include "vmha.nodeAgent.name" .) .Values.nodeAgent.serviceAccount.name }}
{{- else }}
{{- required "nodeAgent.serviceAccount.name is required when nodeAgent.serviceAccount.create is false" .Values.nodeAgent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Service in front of the webhook server: the operator's. */}}
{{- define "vmha.webhook.serviceName" -}}
{{- include "vmha.operator.name" . }}
{{- end }}

{{- define "vmha.webhook.secretName" -}}
{{- printf "%s-webhook-tls" (include "vmha.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of both webhook configurations (Mutating... and Validating...). */}}
{{- define "vmha.webhook.configurationName" -}}
{{- include "vmha.fullname" . }}
{{- end }}

{{- define "vmha.operator.peeringName" -}}
{{- default (include "vmha.operator.name" .) .Values.operator.peeringName }}
{{- end }}

{{/* Whether the operator runs as an active/standby set (kopf peering). */}}
{{- define "vmha.operator.peering" -}}
{{- if gt (int .Values.operator.replicas) 1 }}true{{ end }}
{{- end }}

{{/* Peering through a KopfPeering in each watched namespace (kopf's choice for an operator
that serves only some namespaces) instead of one ClusterKopfPeering. */}}
{{- define "vmha.operator.namespacedPeering" -}}
{{- if and (include "vmha.operator.peering" .) .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/* Messaging ------------------------------------------------------------------------- */}}

{{/* Server group messaging between agents: needs the agents. */}}
{{- define "vmha.messaging" -}}
{{- if and .Values.nodeAgent.enabled .Values.messaging.enabled }}true{{ end }}
{{- end }}

{{/* Votes: the operator asks guests through their agents. */}}
{{- define "vmha.votes" -}}
{{- if and (include "vmha.messaging" .) .Values.votes.enabled }}true{{ end }}
{{- end }}

{{/* The audience of the tokens agents and the operator show each other (the agents'
`messaging.token_audience` default). */}}
{{- define "vmha.messaging.audience" -}}
vmha.io/node-agent
{{- end }}

{{/* Where the pods find their messaging certificate (ca.crt, tls.crt, tls.key) and token. */}}
{{- define "vmha.messaging.tlsDir" -}}
/etc/vmha/messaging-tls
{{- end }}

{{- define "vmha.messaging.tokenDir" -}}
/var/run/secrets/vmha
{{- end }}

{{- define "vmha.messaging.caSecretName" -}}
{{- printf "%s-messaging-ca" (include "vmha.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vmha.nodeAgent.tlsSecretName" -}}
{{- printf "%s-tls" (include "vmha.nodeAgent.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vmha.operator.messagingSecretName" -}}
{{- printf "%s-messaging-tls" (include "vmha.operator.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The projected volume with a pod's own ServiceAccount token for the agents: bound to
the pod (so the agents learn its node from TokenReview), renewed by the kubelet. */}}
{{- define "vmha.messaging.tokenVolume" -}}
- name: messaging-token
  projected:
    sources:
      - serviceAccountToken:
          audience: {{ include "vmha.messaging.audience" . }}
          expirationSeconds: {{ int .Values.messaging.tokenExpirationSeconds }}
          path: token
{{- end }}

{{/* Labels ----------------------------------------------------------------------------- */}}

{{- define "vmha.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "vmha.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vmha
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vmha.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vmha.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "vmha.nodeAgent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vmha.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end }}

{{- define "vmha.operator.labels" -}}
{{ include "vmha.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "vmha.nodeAgent.labels" -}}
{{ include "vmha.labels" . }}
app.kubernetes.io/component: node-agent
{{- end }}

{{/* Images: `{{ include "vmha.image" (list .Values.operator.image .) }}` */}}
{{- define "vmha.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/* Monitoring objects are rendered only where the Prometheus Operator's API exists. */}}
{{- define "vmha.monitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/* The webhook's namespaceSelector: given, or derived from operator.watchNamespaces. */}}
{{- define "vmha.webhook.namespaceSelector" -}}
{{- if .Values.webhook.namespaceSelector }}
{{- toYaml .Values.webhook.namespaceSelector }}
{{- else if .Values.operator.watchNamespaces -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: In
    values: {{ toJson .Values.operator.watchNamespaces }}
{{- end }}
{{- end }}

{{/* The generated webhook CA and serving certificate (without cert-manager), as JSON with
base64 PEM `ca`, `cert`, `key`. Generated once per render and shared by the Secret, the
webhook configurations and the operator's checksum annotation (memoized in the root
context, which every template of the chart shares). An existing Secret is kept, so upgrades
do not replace the certificate: `lookup` sees the cluster on install/upgrade, not in
`helm template`. */}}
{{- define "vmha.webhook.tls" -}}
{{- if not (hasKey . "vmhaWebhookTLS") }}
{{- $namespace := .Release.Namespace }}
{{- $existing := lookup "v1" "Secret" $namespace (include "vmha.webhook.secretName" .) }}
{{- $data := dig "data" (dict) $existing }}
{{- $tls := dict }}
{{- if and (index $data "ca.crt") (index $data "tls.crt") (index $data "tls.key") }}
{{- $tls = dict "ca" (index $data "ca.crt") "cert" (index $data "tls.crt") "key" (index $data "tls.key") }}
{{- else }}
{{- $service := include "vmha.webhook.serviceName" . }}
{{- $days := int .Values.webhook.certificateValidityDays }}
{{- $ca := genCA (printf "%s-webhook-ca" (include "vmha.fullname" .)) $days }}
{{- $hosts := list $service (printf "%s.%s" $service $namespace) (printf "%s.%s.svc" $service $namespace) (printf "%s.%s.svc.cluster.local" $service $namespace) }}
{{- $cert := genSignedCert (printf "%s.%s.svc" $service $namespace) nil $hosts $days $ca }}
{{- $tls = dict "ca" ($ca.Cert | b64enc) "cert" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) }}
{{- end }}
{{- $_ := set . "vmhaWebhookTLS" $tls }}
{{- end }}
{{- index . "vmhaWebhookTLS" | toJson }}
{{- end }}

{{/* The certificates the agents' CA signs, as a JSON list: each with its Secret, its name
(cert-manager Certificate and common name), its `key` in vmha.messaging.tls, the labels of
its owner and its usages (cert-manager; Helm's genSignedCert gives serverAuth and
clientAuth). The agents share one; with votes the operator has its own. */}}
{{- define "vmha.messaging.leaves" -}}
{{- $leaves := list (dict
  "secret" (include "vmha.nodeAgent.tlsSecretName" .)
  "name" (include "vmha.nodeAgent.name" .)
  "key" "agent"
  "labels" (include "vmha.nodeAgent.labels" .)
  "usages" (list "server auth" "client auth" "digital signature")) }}
{{- if include "vmha.votes" . }}
{{- $leaves = append $leaves (dict
  "secret" (include "vmha.operator.messagingSecretName" .)
  "name" (printf "%s-messaging" (include "vmha.operator.name" .))
  "key" "operator"
  "labels" (include "vmha.operator.labels" .)
  "usages" (list "client auth" "digital signature")) }}
{{- end }}
{{- toJson $leaves }}
{{- end }}

{{/* The agents' CA and the certificates it signs (without cert-manager), as JSON with base64
PEM `ca`, `caKey` and `<key>Cert`, `<key>Key` of each of vmha.messaging.leaves. Memoized
like vmha.webhook.tls. Kept
across upgrades: the CA from its Secret (so a leaf can be renewed alone: delete its Secret),
each leaf from its Secret while that still names the same CA. */}}
{{- define "vmha.messaging.tls" -}}
{{- if not (hasKey . "vmhaMessagingTLS") }}
{{- $namespace := .Release.Namespace }}
{{- $days := int .Values.messaging.certificateValidityDays }}
{{- $fullname := include "vmha.fullname" . }}
{{- $stored := dig "data" (dict) (lookup "v1" "Secret" $namespace (include "vmha.messaging.caSecretName" .)) }}
{{- $ca := dict }}
{{- if and (index $stored "tls.crt") (index $stored "tls.key") }}
{{- $ca = buildCustomCert (index $stored "tls.crt") (index $stored "tls.key") }}
{{- else }}
{{- $ca = genCA (printf "%s-messaging-ca" $fullname) $days }}
{{- end }}
{{- $tls := dict "ca" ($ca.Cert | b64enc) "caKey" ($ca.Key | b64enc) }}
{{- range $leaf := include "vmha.messaging.leaves" . | fromJsonArray }}
{{- $data := dig "data" (dict) (lookup "v1" "Secret" $namespace $leaf.secret) }}
{{- if and (eq (index $data "ca.crt" | default "") $tls.ca) (index $data "tls.crt") (index $data "tls.key") }}
{{- $_ := set $tls (printf "%sCert" $leaf.key) (index $data "tls.crt") }}
{{- $_ := set $tls (printf "%sKey" $leaf.key) (index $data "tls.key") }}
{{- else }}
{{- $cert := genSignedCert $leaf.name nil nil $days $ca }}
{{- $_ := set $tls (printf "%sCert" $leaf.key) ($cert.Cert | b64enc) }}
{{- $_ := set $tls (printf "%sKey" $leaf.key) ($cert.Key | b64enc) }}
{{- end }}
{{- end }}
{{- $_ := set . "vmhaMessagingTLS" $tls }}
{{- end }}
{{- index . "vmhaMessagingTLS" | toJson }}
{{- end }}

{{- define "vmha.certManager.selfSignedIssuer" -}}
{{- printf "%s-selfsigned" (include "vmha.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
