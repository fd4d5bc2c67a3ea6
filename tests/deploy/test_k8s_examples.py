"""The plain manifests under k8s/ are the chart rendered for each example environment: they
are current (regenerated output equals the committed file) and pass the same checks."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate as kv
import pytest
import yaml

from services.deploy.examples import ROOT, environments, render_example
from tests.deploy.chart import CRD_KINDS, KUBE_VERSION, of_kind

ENVS = environments()


def test_both_environments_exist() -> None:
    assert {p.name for p in ENVS} == {"cpu-dev", "gpu-prod"}


@pytest.mark.parametrize("env", ENVS, ids=[p.name for p in ENVS])
def test_committed_manifests_are_current(env: Path) -> None:
    committed = (env / "bedside.yaml").read_text(encoding="utf-8")
    assert committed == render_example(env / "values.yaml"), (
        f"{env.relative_to(ROOT)}/bedside.yaml is stale: run python -m services.deploy.examples")


@pytest.mark.parametrize("env", ENVS, ids=[p.name for p in ENVS])
def test_example_objects_are_valid(env: Path) -> None:
    docs = [d for d in yaml.safe_load_all((env / "bedside.yaml").read_text()) if d]
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kv.validate(doc, KUBE_VERSION, strict=True)
    (isvc,) = of_kind(docs, "InferenceService")
    (runtime,) = of_kind(docs, "ServingRuntime")
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert isvc["spec"]["predictor"]["model"]["storageUri"].split("://")[0] in ("pvc", "s3")
    limits = runtime["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) is (env.name == "gpu-prod")
    if env.name == "cpu-dev":
        assert not of_kind(docs, "PrometheusRule")
        # the OpenVINO path: the stock NGC image's openvino backend, no custom Triton image
        (container,) = runtime["spec"]["containers"]
        assert container["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
        assert "--model-config-name=openvino" in container["args"]
    else:
        (sts,) = of_kind(docs, "StatefulSet")
        args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--triton-url=bedside-triton-predictor.bedside.svc:80" in args
        assert "--allowed-ae=PACS_MAIN" in args
