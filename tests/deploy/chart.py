"""Rendering helpers for the chart tests: the chart rendered through the Helm SDK, split into
Kubernetes objects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "bedside"
KUBE_VERSION = "1.35.0"  # a current Kubernetes release, in kubernetes-validate's schemas
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ServingRuntime",
             "InferenceService"}

# Value permutations the chart is tested with (name -> values).
PERMUTATIONS: dict[str, dict[str, Any]] = {
    "defaults (gpu, pvc)": {},
    "cpu, object store": {
        "triton": {"gpu": {"enabled": False}, "nodeSelector": {}, "tolerations": []},
        "model": {"repository": {"source": "objectStore", "objectStore": {
            "uri": ":s3,provider=AWS,env_auth=true:models/bedside",
            "credentialsSecret": "s3-credentials"}}},
    },
    "gpu, oci, tensorrt engines, autoscaling": {
        "model": {"repository": {"source": "oci", "oci": {
            "image": {"repository": "registry.example.org/models/cxr", "tag": "1.0.0"}}}},
        "tensorrt": {"engineBuild": {"enabled": True}},
        "triton": {"autoscaling": {"enabled": True}, "modelControlMode": "explicit"},
        # several gateway replicas: the PostgreSQL job table and one shared spool
        "gateway": {"autoscaling": {"enabled": True}, "spool": {"shared": {"enabled": True}},
                    "jobTable": {"backend": "postgresql",
                                 "postgresql": {"host": "jobs.db.svc"}}},
    },
    "two gateway replicas on postgresql, an existing shared spool claim": {
        "gateway": {"replicas": 2,
                    "spool": {"shared": {"enabled": True, "existingClaim": "spool-rwx"}},
                    "jobTable": {"backend": "postgresql", "postgresql": {
                        "host": "jobs.db.svc", "database": "bedside_jobs", "user": "gw",
                        "passwordSecret": {"name": "jobs-db", "key": "pw"}}}},
    },
    "kserve on, tls on": {
        "kserve": {"enabled": True},
        "gateway": {"ingress": {"enabled": True, "tls": {"enabled": True}},
                    "dicomTls": {"enabled": True},
                    "allowedAETitles": ["MODALITY1", "PACS"],
                    "service": {"dicomType": "LoadBalancer"}},
    },
    "tls off, ingress without tls": {
        "gateway": {"ingress": {"enabled": True, "tls": {"enabled": False}},
                    "dicomTls": {"enabled": False}},
    },
    "gateway tls with client certificates, auth off, plain dicom": {
        "gateway": {"tls": {"enabled": True, "clientCA": True}, "auth": {"enabled": False},
                    "dicomTls": {"enabled": False}, "ingress": {"enabled": True},
                    "allowedSources": ["10.0.0.0/8"],
                    "audit": {"log": "/var/lib/bedside/spool/audit.jsonl",
                              "syslog": "syslog.logging.svc:514"}},
    },
    "gateway tls and dicom tls from one certificate": {
        "gateway": {"tls": {"enabled": True}, "dicomTls": {"enabled": True}},
    },
    "results delivery to a pacs (dicom tls) and a de-identified stow-rs": {
        "gateway": {"delivery": {"secretName": "bedside-delivery", "routes": {
            "deidentification": {"secret_file": "/etc/bedside/delivery/deid.key"},
            "destinations": {
                "pacs": {"type": "dimse", "host": "pacs.hospital.example", "port": 2762,
                         "called_aet": "PACS",
                         "tls": {"ca": "/etc/bedside/delivery/pacs-ca.pem"}},
                "research": {"type": "stowrs", "url": "https://research.example/dicom-web/studies",
                             "bearer_token_file": "/etc/bedside/delivery/research.token"}},
            "routes": [
                {"name": "research", "protocols": ["stow"], "destinations": ["research"],
                 "deidentify": True},
                {"name": "default", "default": True, "destinations": ["pacs"]}]}}},
    },
}


def render(values: dict[str, Any], release: str = "demo",
           namespace: str = "bedside") -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered: dict[str, str] = chart.render(values, name=release, namespace=namespace)
    return rendered


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) for every object that runs containers."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d["kind"] == "ServingRuntime":
            yield f"ServingRuntime/{d['metadata']['name']}", d["spec"]
