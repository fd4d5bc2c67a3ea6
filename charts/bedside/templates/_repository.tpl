{{/*
The model repository for Triton and the engine-build Job: volumes and the init container that
fills the scratch volume for the objectStore and oci sources. The pvc source mounts the claim.
*/}}

{{- define "bedside.repository.volume" -}}
{{- $repo := .Values.model.repository -}}
- name: model-repository
{{- if eq $repo.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $repo.pvc.claimName }}
    readOnly: {{ .readOnly | default false }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $repo.scratchSize }}
{{- end }}
{{- end -}}

{{- define "bedside.repository.mount" -}}
- name: model-repository
  mountPath: /models
{{- if and (eq .Values.model.repository.source "pvc") .Values.model.repository.pvc.subPath }}
  subPath: {{ .Values.model.repository.pvc.subPath }}
{{- end }}
  readOnly: {{ .readOnly | default false }}
{{- end -}}

{{- define "bedside.repository.initContainers" -}}
{{- $repo := .Values.model.repository -}}
{{- if eq $repo.source "objectStore" }}
- name: fetch-models
  image: {{ include "bedside.image" $repo.objectStore.image }}
  imagePullPolicy: IfNotPresent
  args: ["copy", "--fast-list", "--transfers", "8", {{ required "model.repository.objectStore.uri is required for the objectStore source" $repo.objectStore.uri | quote }}, "/models"]
  env:
    - name: RCLONE_CONFIG
      value: /tmp/rclone.conf
  {{- with $repo.objectStore.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  securityContext:
    {{- include "bedside.containerSecurityContext" . | nindent 4 }}
  resources:
    requests: {cpu: 250m, memory: 256Mi}
    limits: {cpu: "1", memory: 1Gi}
  volumeMounts:
    - name: model-repository
      mountPath: /models
    - name: tmp
      mountPath: /tmp
{{- else if eq $repo.source "oci" }}
- name: copy-models
  image: {{ include "bedside.image" (dict "repository" (required "model.repository.oci.image.repository is required for the oci source" $repo.oci.image.repository) "tag" (required "model.repository.oci.image.tag is required for the oci source" $repo.oci.image.tag)) }}
  imagePullPolicy: IfNotPresent
  command: ["cp", "-R", "{{ $repo.oci.path }}/.", "/target/"]
  securityContext:
    {{- include "bedside.containerSecurityContext" . | nindent 4 }}
  resources:
    requests: {cpu: 100m, memory: 128Mi}
    limits: {cpu: "1", memory: 512Mi}
  volumeMounts:
    - name: model-repository
      mountPath: /target
{{- end }}
{{- end -}}
