"""The Kubernetes side of a deployment (the ``kubernetes`` client): wait for the rollout of
the release's workloads and for Triton to report the model version ready."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from services.deploy.errors import DeployError, RolloutTimeout

LOG = logging.getLogger(__name__)
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


@dataclass(frozen=True)
class Targets:
    """What to wait for, read from the manifest Helm applied."""

    workloads: tuple[tuple[str, str], ...]  # (kind, name)
    triton_service: tuple[str, int] | None  # (service, HTTP port) of the chart's Triton
    inference_service: str | None  # KServe InferenceService name

    @classmethod
    def from_manifest(cls, manifest: str) -> Targets:
        workloads: list[tuple[str, str]] = []
        service: tuple[str, int] | None = None
        isvc: str | None = None
        for doc in yaml.safe_load_all(manifest):
            if not isinstance(doc, dict):
                continue
            kind, meta = doc.get("kind"), doc.get("metadata", {})
            name = str(meta.get("name", ""))
            component = meta.get("labels", {}).get("app.kubernetes.io/component")
            if kind in WORKLOAD_KINDS:
                workloads.append((kind, name))
            elif kind == "Service" and component == "triton":
                ports = {p.get("name"): int(p["port"]) for p in doc["spec"]["ports"]}
                if "http" in ports:
                    service = (name, ports["http"])
            elif kind == "InferenceService":
                isvc = name
        return cls(tuple(workloads), service, isvc)


class Cluster(Protocol):
    def wait_rollout(self, namespace: str, targets: Targets, deadline: float) -> None: ...

    def wait_model_ready(self, namespace: str, targets: Targets, model: str, version: int,
                         deadline: float) -> None: ...


def rollout_complete(obj: dict[str, Any]) -> bool:
    """kubectl rollout status's rule for Deployments and StatefulSets."""
    spec, status = obj.get("spec", {}), obj.get("status") or {}
    want = int(spec.get("replicas", 1))
    if int(status.get("observedGeneration") or 0) < int(obj["metadata"].get("generation", 0)):
        return False
    updated = int(status.get("updatedReplicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    if obj.get("kind") == "StatefulSet":
        revision_done = status.get("updateRevision") == status.get("currentRevision") or \
            updated >= want
        return revision_done and ready >= want
    available = int(status.get("availableReplicas") or 0)
    return updated >= want and available >= want and int(status.get("replicas") or 0) <= want


class KubeCluster:
    """The cluster behind a kubeconfig (or the in-cluster service account)."""

    def __init__(self, kubeconfig: Path | None = None, context: str | None = None,
                 poll_s: float = 2.0, api_client: Any | None = None) -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_kube_config(config_file=None if kubeconfig is None
                                        else str(kubeconfig), context=context)
            except config.ConfigException:
                config.load_incluster_config()
            api_client = client.ApiClient()
        self._client = client
        self._api = api_client
        self._apps = client.AppsV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._poll_s = poll_s

    def _until(self, deadline: float, what: str, check: Callable[[], bool]) -> None:
        while True:
            try:
                if check():
                    return
            except self._client.ApiException as exc:
                if exc.status not in (404, 409, 429, 500, 502, 503, 504):
                    raise DeployError(f"{what}: the API server answered {exc.status}") from exc
                LOG.debug("%s: %s, retrying", what, exc.status)
            if time.monotonic() >= deadline:
                raise RolloutTimeout(f"{what}: not done before the timeout")
            time.sleep(self._poll_s)

    def wait_rollout(self, namespace: str, targets: Targets, deadline: float) -> None:
        for kind, name in targets.workloads:
            read = (self._apps.read_namespaced_deployment if kind == "Deployment"
                    else self._apps.read_namespaced_stateful_set)

            def done(read: Any = read, kind: str = kind, name: str = name) -> bool:
                obj = self._api.sanitize_for_serialization(read(name, namespace))
                obj["kind"] = kind
                return rollout_complete(obj)

            self._until(deadline, f"rollout of {kind} {name}", done)
            LOG.info("%s %s rolled out", kind, name)
        if targets.inference_service:
            isvc = targets.inference_service

            def isvc_ready() -> bool:
                obj: Any = self._custom.get_namespaced_custom_object(
                    "serving.kserve.io", "v1beta1", namespace, "inferenceservices", isvc)
                conditions = (obj.get("status") or {}).get("conditions") or []
                return any(c.get("type") == "Ready" and c.get("status") == "True"
                           for c in conditions)

            self._until(deadline, f"InferenceService {isvc}", isvc_ready)

    def wait_model_ready(self, namespace: str, targets: Targets, model: str, version: int,
                         deadline: float) -> None:
        if targets.triton_service is None:  # KServe: its Ready condition covers Triton's
            return
        service, port = targets.triton_service

        def ready() -> bool:
            # Triton's own readiness endpoint, reached through the API server's service proxy.
            try:
                self._core.connect_get_namespaced_service_proxy_with_path(
                    f"{service}:{port}", namespace, f"v2/models/{model}/versions/{version}/ready")
            except self._client.ApiException as exc:
                if exc.status == 400:  # Triton: model not ready (yet)
                    return False
                raise
            return True

        self._until(deadline, f"Triton readiness of {model} version {version}", ready)
        LOG.info("Triton reports %s version %d ready", model, version)
