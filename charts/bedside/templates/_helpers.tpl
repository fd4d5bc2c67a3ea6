{{/* Names and labels shared by every object of the release. */}}

{{- define "bedside.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bedside.fullname" -}}
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

{{- define "bedside.triton.fullname" -}}
{{- printf "%s-triton" (include "bedside.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bedside.gateway.fullname" -}}
{{- printf "%s-gateway" (include "bedside.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bedside.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "bedside.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bedside
{{- end -}}

{{/* Selector labels; $component is "triton" or "gateway". */}}
{{- define "bedside.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bedside.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "bedside.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* The container security context every Bedside container runs with. */}}
{{- define "bedside.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Where the gateway reaches Triton's gRPC endpoint. */}}
{{- define "bedside.tritonGrpcUrl" -}}
{{- if .Values.gateway.tritonUrl -}}
{{- .Values.gateway.tritonUrl -}}
{{- else if .Values.kserve.enabled -}}
{{- printf "%s-predictor.%s.svc:%d" (include "bedside.triton.fullname" .) .Release.Namespace (int .Values.kserve.grpcServicePort) -}}
{{- else -}}
{{- printf "%s.%s.svc:%d" (include "bedside.triton.fullname" .) .Release.Namespace (int .Values.triton.ports.grpc) -}}
{{- end -}}
{{- end -}}

{{/* GPU-pool scheduling for Triton and the engine-build Job: nodeSelector and tolerations
apply while gpu.enabled (they describe the GPU pool); affinity always. */}}
{{- define "bedside.gpuScheduling" -}}
{{- if .gpu.enabled }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Triton's resources: the GPU limit is added when gpu.enabled. */}}
{{- define "bedside.tritonResources" -}}
{{- $res := deepCopy .Values.triton.resources -}}
{{- if .Values.triton.gpu.enabled -}}
{{- $_ := set $res.limits .Values.triton.gpu.resourceName (toString .Values.triton.gpu.count) -}}
{{- $_ := set $res.requests .Values.triton.gpu.resourceName (toString .Values.triton.gpu.count) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{- define "bedside.engineCacheClaim" -}}
{{- default (printf "%s-engine-cache" (include "bedside.fullname" .)) .Values.tensorrt.engineBuild.cache.existingClaim -}}
{{- end -}}
