"""Both reference architectures (DenseNet121, BasicUNet) optimized and served by real Triton."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from optimizer.benchmark import onnx_session, run_onnx
from optimizer.contract.manifest import Manifest
from optimizer.dataset import load_labelled
from optimizer.pipeline import OptimizeRequest, optimize
from optimizer.reference import write_reference
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import triton_env
from tests.gateway.util import dicom_bytes, make_instance
from tests.optimizer.quick_bench import QUICK_BENCH

pytestmark = pytest.mark.integration
MODELS = (("densenet121", 64), ("unet2d", 32))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, TritonServer]]:
    root = tmp_path_factory.mktemp("refs")
    for name, side in MODELS:
        write_reference(name, root / name, side=side, calibration=4, validation=8)
        optimize(OptimizeRequest(
            checkpoint=root / name / "model.pt", manifest=root / name / "manifest.json",
            calibration_dir=root / name / "calibration",
            validation_dir=root / name / "validation", out_dir=root / "out" / name,
            threads=1, precisions=("fp32", "int8"), calibration_methods=("minmax",),
            recovery=False, bench=QUICK_BENCH,
        ))
        # one repository holding both models, as a cluster's model store would
        (root / "repo").mkdir(exist_ok=True)
        (root / "out" / name / "repository" / name).rename(root / "repo" / name)
    triton = TritonServer(TritonInstall.discover(triton_env()), root / "repo", root / "triton",
                          TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    try:
        yield root, triton
    finally:
        triton.stop()


@pytest.mark.parametrize(("name", "side"), MODELS)
def test_triton_serves_reference_model_like_in_process(
    served: tuple[Path, TritonServer], name: str, side: int
) -> None:
    root, triton = served
    manifest = Manifest.load(root / "repo" / name / "manifest.json")
    x = load_labelled(root / name / "validation", manifest).inputs[:3]
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        assert client.is_model_ready(name)
        tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        out = client.infer(name, [tensor], client_timeout=60).as_numpy(manifest.output.name)
    finally:
        client.close()
    assert out.shape == (3, *manifest.output_shape)
    report = json.loads((root / "out" / name / "report.json").read_text())
    chosen = next(v for v in report["variants"] if v["name"] == report["selected"])
    expected = run_onnx(onnx_session(root / "out" / name / chosen["file"], 1), x)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_gateway_summarises_segmentation(served: tuple[Path, TritonServer],
                                         tmp_path: Path) -> None:
    root, triton = served
    from starlette.testclient import TestClient

    gateway = Gateway(GatewayConfig(
        model_repository=root / "repo", model_name="unet2d", triton_grpc_url=triton.grpc_url,
        spool_dir=tmp_path, http_port=free_port(), dicom_port=free_port()))
    from services.gateway.edges.rest import create_app

    app = create_app(gateway.core, gateway.results, gateway.metrics, lambda: True, 1 << 24)
    with TestClient(app) as client:
        r = client.post("/v1/infer", content=dicom_bytes(make_instance(size=64)),
                        headers={"Content-Type": "application/dicom"})
    gateway.inferer.close()
    assert r.status_code == 200, r.text
    [finding] = r.json()["findings"]
    assert finding["label"] == "lesion"
    assert 0 <= finding["pixels"] <= 32 * 32
    assert finding["fraction"] == pytest.approx(finding["pixels"] / (32 * 32), abs=1e-6)
    assert finding["positive"] == (finding["pixels"] > 0)
