"""An FP16-I/O variant end to end: Triton config in FP16, the gateway sending FP16 tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from starlette.testclient import TestClient
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.benchmark import onnx_session, run_onnx
from optimizer.contract.findings import activate
from optimizer.contract.preprocess import preprocess
from optimizer.pipeline import OptimizeRequest, optimize
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.edges.rest import create_app
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env
from tests.gateway.util import dicom_bytes, make_instance
from tests.optimizer.quick_bench import QUICK_BENCH

pytestmark = pytest.mark.integration


def test_fp16_io_variant_is_served_and_called_in_fp16(tiny_model: Path, tiny_data: Path,
                                                      tmp_path: Path) -> None:
    result = optimize(OptimizeRequest(
        checkpoint=tiny_model / "model.pt", manifest=tiny_model / "manifest.json",
        calibration_dir=tiny_data / "calibration", validation_dir=tiny_data / "validation",
        out_dir=tmp_path / "out", threads=1, precisions=("fp32", "fp16"), fp16_io="fp16",
        mae_tolerances={"fp32": 0.0, "fp16": 1e-2},  # force the FP16 variant to be chosen
        bench=QUICK_BENCH,
    ))
    assert result.report["selected"] == "onnx-fp16"
    model_dir = result.repository / TINY_MANIFEST.name
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.input[0].data_type == mc.TYPE_FP16 and cfg.output[0].data_type == mc.TYPE_FP16

    triton = TritonServer(TritonInstall.discover(triton_env()), result.repository,
                          tmp_path / "triton", TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    try:
        gateway = Gateway(GatewayConfig(
            model_repository=result.repository, model_name=TINY_MANIFEST.name,
            triton_grpc_url=triton.grpc_url, spool_dir=tmp_path / "spool",
            http_port=free_port(), dicom_port=free_port()))
        app = create_app(gateway.core, gateway.results, gateway.metrics, lambda: True, 1 << 24)
        ds = make_instance(5)
        with TestClient(app) as client:
            r = client.post("/v1/infer", content=dicom_bytes(ds),
                            headers={"Content-Type": "application/dicom"})
        gateway.inferer.close()
    finally:
        triton.stop()
    assert r.status_code == 200, r.text
    x = preprocess(ds, TINY_MANIFEST.input)[None]
    expected = activate(run_onnx(onnx_session(model_dir / "1" / "model.onnx", 1), x),
                        "sigmoid")[0, 0]
    assert r.json()["findings"][0]["score"] == pytest.approx(float(expected), abs=1e-3)
    assert np.isfinite(r.json()["findings"][0]["score"])
