{{/*
A `helm test` pod that runs a short Python check in the product image (so tests need no
other image). Include with (dict "ctx" $ "name" NAME "script" PYTHON "volumes" LIST).
*/}}
{{- define "adapterhub.testPod" -}}
{{- $ctx := .ctx }}
apiVersion: v1
kind: Pod
metadata:
  name: {{ printf "%s-test-%s" (include "adapterhub.fullname" $ctx) .name }}
  labels:
    {{- include "adapterhub.componentLabels" (dict "ctx" $ctx "component" "test") | nindent 4 }}
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "adapterhub.serviceAccountName" $ctx }}
  {{- with (include "adapterhub.imagePullSecrets" $ctx) }}{{ . | trim | nindent 2 }}{{ end }}
  {{- with (include "adapterhub.podSecurity" $ctx) }}{{ . | trim | nindent 2 }}{{ end }}
  containers:
    - name: check
      image: {{ include "adapterhub.image" (dict "ctx" $ctx "image" (dict)) }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      command: [python, -c]
      args:
        - |
          {{- .script | trim | nindent 10 }}
      resources:
        requests: {cpu: 50m, memory: 128Mi}
        limits: {cpu: 500m, memory: 512Mi}
      securityContext:
        {{- toYaml $ctx.Values.containerSecurityContext | nindent 8 }}
        readOnlyRootFilesystem: true
      {{- with .volumes }}
      volumeMounts:
        {{- range . }}
        - {name: {{ .name }}, mountPath: {{ .mountPath }}, readOnly: true}
        {{- end }}
      {{- end }}
  {{- with .volumes }}
  volumes:
    {{- range . }}
    - name: {{ .name }}
      secret:
        secretName: {{ .secretName }}
    {{- end }}
  {{- end }}
{{- end }}
