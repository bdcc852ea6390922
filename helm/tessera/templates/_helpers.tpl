{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "tessera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or <release> if it already contains the chart name. */}}
{{- define "tessera.fullname" -}}
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

{{- define "tessera.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource of the chart. */}}
{{- define "tessera.commonLabels" -}}
helm.sh/chart: {{ include "tessera.chart" . }}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tessera
{{- end }}

{{/* Labels of the agent's resources. */}}
{{- define "tessera.labels" -}}
{{ include "tessera.commonLabels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{/* Selects the agent pods (never change on upgrade: DaemonSet selectors are immutable). */}}
{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{/* Selects the helm test pod. */}}
{{- define "tessera.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{- define "tessera.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tessera.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is set. Takes an image values map. */}}
{{- define "tessera.imageRef" -}}
{{- $img := .image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (toString (default .default $img.tag)) -}}
{{- end -}}
{{- end }}

{{- define "tessera.image" -}}
{{- include "tessera.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) -}}
{{- end }}

{{- define "tessera.initImage" -}}
{{- include "tessera.imageRef" (dict "image" .Values.initImage "default" "latest") -}}
{{- end }}

{{/* Paths inside the agent container (fixed: the config and docs depend on them). */}}
{{- define "tessera.socketDir" -}}/run/tessera/sockets{{- end }}
{{- define "tessera.socketPath" -}}{{ include "tessera.socketDir" . }}/{{ .Values.socket.fileName }}{{- end }}
{{- define "tessera.dataDir" -}}/var/lib/tessera{{- end }}
{{- define "tessera.configDir" -}}/etc/tessera{{- end }}
{{- define "tessera.caDir" -}}/etc/tessera/ca{{- end }}
{{- define "tessera.policyDir" -}}/etc/tessera/policies{{- end }}
{{- define "tessera.adminSocketDir" -}}/run/tessera/admin{{- end }}
{{- define "tessera.adminSocketPath" -}}{{ include "tessera.adminSocketDir" . }}/admin.sock{{- end }}

{{/* The ConfigMap mounted as the exchange's policy directory. */}}
{{- define "tessera.policyConfigMap" -}}
{{- .Values.exchange.existingPolicyConfigMap | default (printf "%s-policies" (include "tessera.fullname" .)) -}}
{{- end }}

{{/*
Refuses values the agent would refuse at start, or that would expose the
operator socket; included by the DaemonSet template.
*/}}
{{- define "tessera.validate" -}}
{{- $sock := clean .Values.socket.hostPath -}}
{{- $admin := clean .Values.admin.socketHostPath -}}
{{- if or (eq $admin $sock) (hasPrefix (printf "%s/" (trimSuffix "/" $sock)) $admin) -}}
{{- fail (printf "admin.socketHostPath %q is inside socket.hostPath %q: every workload that mounts the socket directory could reach the operator socket (approvals). Choose a directory outside it, e.g. /run/tessera/admin." .Values.admin.socketHostPath .Values.socket.hostPath) -}}
{{- end -}}
{{- if .Values.exchange.enabled -}}
{{- if eq .Values.socket.fileName "exchange.sock" -}}
{{- fail "socket.fileName \"exchange.sock\" is the token exchange's socket name (exchange.sock beside the Workload API socket); choose another name, e.g. agent.sock" -}}
{{- end -}}
{{- if and .Values.exchange.existingPolicyConfigMap .Values.exchange.policies -}}
{{- fail "set exchange.policies or exchange.existingPolicyConfigMap, not both" -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* Where workloads see the socket directory (CSI driver convention). */}}
{{- define "tessera.workloadSocketDir" -}}/spiffe-workload-api{{- end }}
{{- define "tessera.workloadEndpoint" -}}unix://{{ include "tessera.workloadSocketDir" . }}/{{ .Values.socket.fileName }}{{- end }}

{{/* A full SPIFFE ID from an entry's spiffe_id: a path is prefixed with the trust domain. */}}
{{- define "tessera.entryId" -}}
{{- $id := .entry.spiffe_id -}}
{{- if hasPrefix "/" $id -}}
{{- printf "spiffe://%s%s" .trustDomain $id -}}
{{- else -}}
{{- $prefix := printf "spiffe://%s/" .trustDomain -}}
{{- if not (hasPrefix $prefix $id) -}}
{{- fail (printf "entries: spiffe_id %q is not in trust domain %q (write a path such as /ns/{k8s:ns}, or a full ID in spiffe://%s/)" $id .trustDomain .trustDomain) -}}
{{- end -}}
{{- $id -}}
{{- end -}}
{{- end }}

{{/* The agent runs as root unless securityContext.runAsUser says otherwise. */}}
{{- define "tessera.runsAsRoot" -}}
{{- if eq (int64 .Values.securityContext.runAsUser) 0 }}true{{ end }}
{{- end }}

{{/* The kubelet is reached on its secure port with the service account token. */}}
{{- define "tessera.kubeletSecure" -}}
{{- if and .Values.kubelet.enabled (eq (int64 .Values.kubelet.readOnlyPort) 0) }}true{{ end }}
{{- end }}
