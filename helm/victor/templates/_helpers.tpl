{{/*
Names, labels and the pieces of the command lines shared by several templates.
*/}}

{{- define "victor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every object: <release>-<chart> unless overridden. */}}
{{- define "victor.fullname" -}}
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

{{- define "victor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "ctx" $ "component" "controller"). */}}
{{- define "victor.labels" -}}
helm.sh/chart: {{ include "victor.chart" .ctx }}
{{ include "victor.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: victor
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "controller"). */}}
{{- define "victor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "victor.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "victor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "victor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "victor.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Pod anti-affinity spreading pods of one component; call with
(dict "ctx" $ "component" "controller" "spec" .Values.podAntiAffinity).
*/}}
{{- define "victor.podAntiAffinity" -}}
podAntiAffinity:
  {{- if eq .spec.type "hard" }}
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: {{ .spec.topologyKey }}
      labelSelector:
        matchLabels:
          {{- include "victor.selectorLabels" . | nindent 10 }}
  {{- else }}
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: {{ .spec.topologyKey }}
        labelSelector:
          matchLabels:
            {{- include "victor.selectorLabels" . | nindent 12 }}
  {{- end }}
{{- end }}

{{/* ---- bundled etcd ---- */}}

{{/* Name of the bundled etcd StatefulSet and of its headless Service (pod names add "-N"). */}}
{{- define "victor.etcd.name" -}}
{{- printf "%s-etcd" (include "victor.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/* DNS name of bundled etcd member N; call with (dict "ctx" $ "member" "$(POD_NAME)" or "name-0"). */}}
{{- define "victor.etcd.memberHost" -}}
{{- printf "%s.%s.%s.svc.%s" .member (include "victor.etcd.name" .ctx) .ctx.Release.Namespace .ctx.Values.clusterDomain }}
{{- end }}

{{/* --initial-cluster of the bundled etcd: name=http://<pod DNS>:<peer port>,... */}}
{{- define "victor.etcd.initialCluster" -}}
{{- $members := list }}
{{- $name := include "victor.etcd.name" . }}
{{- range $i := until (int .Values.etcd.bundled.replicas) }}
{{- $member := printf "%s-%d" $name $i }}
{{- $host := include "victor.etcd.memberHost" (dict "ctx" $ "member" $member) }}
{{- $members = append $members (printf "%s=http://%s:%d" $member $host (int $.Values.etcd.bundled.peerPort)) }}
{{- end }}
{{- join "," $members }}
{{- end }}

{{/* etcd client URLs the controller uses: the external ones or every bundled member. */}}
{{- define "victor.etcd.endpoints" -}}
{{- if .Values.etcd.bundled.enabled }}
{{- $urls := list }}
{{- $name := include "victor.etcd.name" . }}
{{- range $i := until (int .Values.etcd.bundled.replicas) }}
{{- $host := include "victor.etcd.memberHost" (dict "ctx" $ "member" (printf "%s-%d" $name $i)) }}
{{- $urls = append $urls (printf "http://%s:%d" $host (int $.Values.etcd.bundled.clientPort)) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* ---- files mounted into the controller (flags point at these paths) ---- */}}
{{- define "victor.paths.grpcTls" -}}/etc/victor/tls{{- end }}
{{- define "victor.paths.clientCa" -}}/etc/victor/client-ca{{- end }}
{{- define "victor.paths.etcdTls" -}}/etc/victor/etcd-tls{{- end }}
{{- define "victor.paths.auth" -}}/etc/victor/auth{{- end }}

{{/* The controller's arguments, one flag per line (each flag also exists as VICTOR_* env). */}}
{{- define "victor.controller.args" -}}
{{- $c := .Values.controller -}}
- --grpc-listen={{ $c.listenAddress }}:{{ int64 $c.grpcPort }}
- --http-listen={{ $c.listenAddress }}:{{ int64 $c.httpPort }}
- --etcd-endpoints={{ include "victor.etcd.endpoints" . }}
- --etcd-prefix={{ $c.etcdPrefix }}
- --etcd-timeout={{ $c.etcdTimeout }}
{{- range $c.mobilePrefixes }}
- --mobile-prefix={{ . }}
{{- end }}
- --session-ttl={{ $c.sessionTtl }}
- --fe-dead-after={{ $c.feDeadAfter }}
- --tombstone-retention={{ $c.tombstoneRetention }}
- --damping-max-moves={{ int64 $c.damping.maxMoves }}
- --damping-window={{ $c.damping.window }}
- --damping-hold={{ $c.damping.hold }}
- --stream-history={{ int64 $c.streamHistory }}
- --stream-history-bytes={{ $c.streamHistoryBytes }}
- --max-report-observations={{ int64 $c.maxReportObservations }}
- --max-connections={{ int64 $c.limits.maxConnections }}
- --max-http-connections={{ int64 $c.limits.maxHttpConnections }}
- --handshake-timeout={{ $c.limits.handshakeTimeout }}
- --idle-timeout={{ $c.limits.idleTimeout }}
- --max-streams-per-connection={{ int64 $c.limits.maxStreamsPerConnection }}
- --max-agent-streams={{ int64 $c.limits.maxAgentStreams }}
- --max-watch-streams={{ int64 $c.limits.maxWatchStreams }}
- --snapshot-rate={{ $c.limits.snapshotRate }}
{{- if $c.requireDeclared }}
- --require-declared
{{- end }}
- --log-format={{ $c.logFormat }}
- {{ printf "--log=%s" $c.log | quote }}
{{- if .Values.tls.enabled }}
- --tls-cert-file={{ include "victor.paths.grpcTls" . }}/tls.crt
- --tls-key-file={{ include "victor.paths.grpcTls" . }}/tls.key
{{- if .Values.tls.clientCA.enabled }}
- --tls-client-ca-file={{ include "victor.paths.clientCa" . }}/ca.crt
{{- end }}
{{- end }}
{{- if and (not .Values.etcd.bundled.enabled) .Values.etcd.external.tls.enabled }}
- --etcd-ca-file={{ include "victor.paths.etcdTls" . }}/ca.crt
{{- if .Values.etcd.external.tls.clientAuth }}
- --etcd-cert-file={{ include "victor.paths.etcdTls" . }}/tls.crt
- --etcd-key-file={{ include "victor.paths.etcdTls" . }}/tls.key
{{- end }}
{{- end }}
{{- if .Values.auth.tokensSecret }}
- --auth-tokens-file={{ include "victor.paths.auth" . }}/tokens
{{- end }}
{{- range $c.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Secret volumes of the controller; each item is renamed to the file name the flags use. */}}
{{- define "victor.controller.volumes" -}}
{{- if .Values.tls.enabled }}
- name: grpc-tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 288 # 0o440: owner and fsGroup read
    items:
      - key: {{ .Values.tls.certKey }}
        path: tls.crt
      - key: {{ .Values.tls.keyKey }}
        path: tls.key
{{- if .Values.tls.clientCA.enabled }}
- name: grpc-client-ca
  secret:
    secretName: {{ default .Values.tls.secretName .Values.tls.clientCA.secretName }}
    defaultMode: 288 # 0o440: owner and fsGroup read
    items:
      - key: {{ .Values.tls.clientCA.key }}
        path: ca.crt
{{- end }}
{{- end }}
{{- if and (not .Values.etcd.bundled.enabled) .Values.etcd.external.tls.enabled }}
{{- $t := .Values.etcd.external.tls }}
- name: etcd-tls
  secret:
    secretName: {{ $t.secretName }}
    defaultMode: 288 # 0o440: owner and fsGroup read
    items:
      - key: {{ $t.caKey }}
        path: ca.crt
      {{- if $t.clientAuth }}
      - key: {{ $t.certKey }}
        path: tls.crt
      - key: {{ $t.keyKey }}
        path: tls.key
      {{- end }}
{{- end }}
{{- if .Values.auth.tokensSecret }}
- name: auth-tokens
  secret:
    secretName: {{ .Values.auth.tokensSecret }}
    defaultMode: 288 # 0o440: owner and fsGroup read
    items:
      - key: {{ .Values.auth.tokensKey }}
        path: tokens
{{- end }}
{{- end }}

{{- define "victor.controller.volumeMounts" -}}
{{- if .Values.tls.enabled }}
- name: grpc-tls
  mountPath: {{ include "victor.paths.grpcTls" . }}
  readOnly: true
{{- if .Values.tls.clientCA.enabled }}
- name: grpc-client-ca
  mountPath: {{ include "victor.paths.clientCa" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- if and (not .Values.etcd.bundled.enabled) .Values.etcd.external.tls.enabled }}
- name: etcd-tls
  mountPath: {{ include "victor.paths.etcdTls" . }}
  readOnly: true
{{- end }}
{{- if .Values.auth.tokensSecret }}
- name: auth-tokens
  mountPath: {{ include "victor.paths.auth" . }}
  readOnly: true
{{- end }}
{{- end }}
