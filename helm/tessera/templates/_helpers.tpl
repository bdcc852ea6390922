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

{{/* Labels of the authority's resources. */}}
{{- define "tessera.authorityLabels" -}}
{{ include "tessera.commonLabels" . }}
app.kubernetes.io/component: authority
{{- end }}

{{/* Selects the authority pods (immutable Deployment selector). */}}
{{- define "tessera.authoritySelectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: authority
{{- end }}

{{/* Name of the authority's resources (Deployment, Service, ConfigMap, ServiceAccount, RBAC, PDB). */}}
{{- define "tessera.authorityName" -}}
{{- printf "%s-authority" (include "tessera.fullname" . | trunc 53 | trimSuffix "-") -}}
{{- end }}

{{/* Paths inside the authority container, and the names the authority's TLS certificate and tokens carry. */}}
{{- define "tessera.authorityConfigDir" -}}/etc/tessera-authority{{- end }}
{{- define "tessera.authorityKeysDir" -}}/etc/tessera-authority/keys{{- end }}
{{- define "tessera.authorityServerName" -}}tessera-authority{{- end }}
{{/* Paths inside the agent container in upstream mode. */}}
{{- define "tessera.upstreamBundleDir" -}}/etc/tessera/upstream{{- end }}
{{- define "tessera.upstreamTokenDir" -}}/var/run/secrets/tessera{{- end }}
{{/* Where agents reach the authority: its Service, by namespace-qualified DNS name. */}}
{{- define "tessera.authorityAddress" -}}
{{- printf "%s.%s.svc:%d" (include "tessera.authorityName" .) .Release.Namespace (.Values.authority.port | int64) -}}
{{- end }}

{{/*
The [[entries]] tables, shared by the agent's and the authority's config so
that both always carry the same list.
*/}}
{{- define "tessera.entriesToml" -}}
{{- range .Values.entries }}

[[entries]]
spiffe_id = {{ include "tessera.entryId" (dict "entry" . "trustDomain" $.Values.trustDomain) | toJson }}
selectors = {{ .selectors | toJson }}
{{- with .hint }}
hint      = {{ . | toJson }}
{{- end }}
{{- with .x509_ttl }}
x509_ttl  = {{ . | toJson }}
{{- end }}
{{- with .jwt_ttl }}
jwt_ttl   = {{ . | toJson }}
{{- end }}
{{- with .wit_ttl }}
wit_ttl   = {{ . | toJson }}
{{- end }}
{{- with .federates_with }}
federates_with = {{ . | toJson }}
{{- end }}
{{- end }}
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
{{- /*
The agent needs hostPID, a hostPath volume and SYS_PTRACE, which the
baseline and restricted Pod Security levels forbid: the DaemonSet would be
accepted (with a warning) and no agent pod would ever be created. Refuse the
install instead, naming the label. `lookup` sees the live namespace only
during install/upgrade; offline rendering (helm template) skips the check.
*/ -}}
{{- if .Values.podSecurityCheck -}}
{{- $ns := lookup "v1" "Namespace" "" .Release.Namespace -}}
{{- $level := dig "metadata" "labels" "pod-security.kubernetes.io/enforce" "" $ns -}}
{{- if and $level (ne $level "privileged") -}}
{{- fail (printf "namespace %q enforces Pod Security level %q (label pod-security.kubernetes.io/enforce): the agent DaemonSet needs hostPID, a hostPath volume and the SYS_PTRACE capability, so the API server would refuse every agent pod (violates PodSecurity %q: host namespaces, hostPath volumes, non-default capabilities) and no agent would start. Install into a namespace labelled for privileged pods: kubectl label namespace %s pod-security.kubernetes.io/enforce=privileged --overwrite (or set podSecurityCheck=false to skip this check)" .Release.Namespace $level (printf "%s:latest" $level) .Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- $sock := clean .Values.socket.hostPath -}}
{{- $admin := clean .Values.admin.socketHostPath -}}
{{- if or (eq $admin $sock) (hasPrefix (printf "%s/" (trimSuffix "/" $sock)) $admin) -}}
{{- fail (printf "admin.socketHostPath %q is inside socket.hostPath %q: every workload that mounts the socket directory could reach the operator socket (approvals). Choose a directory outside it, e.g. /run/tessera/admin." .Values.admin.socketHostPath .Values.socket.hostPath) -}}
{{- end -}}
{{- with .Values.authority -}}
{{- if .enabled -}}
{{- if not .keysSecret -}}
{{- fail "authority.enabled=true needs authority.keysSecret: the name of an existing Secret with the authority's keys (ca.crt, ca.key, jwt.key, access.key, wit.key from `tessera authority init --dir keys --trust-domain <trustDomain>`; then `kubectl create secret generic tessera-authority-keys --from-file=keys/`). See docs/kubernetes.md, section Multi-node: the authority." -}}
{{- end -}}
{{- if not .bundleConfigMap -}}
{{- fail "authority.enabled=true needs authority.bundleConfigMap: the name of an existing ConfigMap with bundle.pem = the authority's CA certificate only (`kubectl create configmap tessera-authority-bundle --from-file=bundle.pem=keys/ca.crt`), the agents' bootstrap trust bundle. See docs/kubernetes.md, section Multi-node: the authority." -}}
{{- end -}}
{{- if .caSecret -}}
{{- fail "authority.caSecret and authority.enabled exclude each other: with the authority the agents get their SVIDs signed upstream and must not hold a CA key; unset authority.caSecret" -}}
{{- end -}}
{{- if eq (int64 .port) (int64 $.Values.admin.port) -}}
{{- fail (printf "authority.port and admin.port are both %d: the authority pod listens on both" (int64 .port)) -}}
{{- end -}}
{{- if ge (int64 .podDisruptionBudget.minAvailable) (int64 .replicas) -}}
{{- fail (printf "authority.podDisruptionBudget.minAvailable (%d) must be below authority.replicas (%d), or no node running an authority pod could ever be drained" (int64 .podDisruptionBudget.minAvailable) (int64 .replicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .Values.https -}}
{{- if .enabled -}}
{{- if not $.Values.authority.enabled -}}
{{- fail "https.enabled=true needs authority.enabled=true: the HTTPS face is served by the authority, which holds the JWT-SVID keys of every node (without it each node's agent signs with its own key, and no single issuer could serve them all). See docs/kubernetes.md." -}}
{{- end -}}
{{- if not .issuer -}}
{{- fail "https.enabled=true needs https.issuer: the https:// URL relying parties configure and JWT-SVIDs carry as iss, e.g. https://tessera.example.com" -}}
{{- end -}}
{{- if has (int64 .port) (list (int64 $.Values.authority.port) (int64 $.Values.admin.port)) -}}
{{- fail (printf "https.port %d is taken in the authority pod by authority.port or admin.port" (int64 .port)) -}}
{{- end -}}
{{- end -}}
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

{{/* Where the HTTPS face's certificate Secret is mounted in the authority pods. */}}
{{- define "tessera.httpsCertDir" -}}
/etc/tessera-authority/https
{{- end }}
