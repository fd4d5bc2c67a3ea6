"""GPU paths. CI and the development machines have no GPU and no TensorRT: these tests skip
there, and run where onnxruntime-gpu with the TensorRT or CUDA provider is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from optimizer import checkpoint
from optimizer.benchmark import run_torch
from optimizer.export import export_onnx
from tests.conftest import TINY_MANIFEST

pytestmark = pytest.mark.gpu
PROVIDERS = ort.get_available_providers()


@pytest.mark.skipif("TensorrtExecutionProvider" not in PROVIDERS,
                    reason="no TensorRT execution provider (onnxruntime-gpu + TensorRT)")
def test_tensorrt_fp16_matches_pytorch_fp32(tiny_model: Path, tmp_path: Path) -> None:
    model = checkpoint.load(tiny_model / "model.pt")
    path = export_onnx(model, TINY_MANIFEST, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=[
        ("TensorrtExecutionProvider", {"trt_fp16_enable": True}), "CUDAExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(4, 1, 64, 64)).astype(np.float32)
    out = session.run(None, {"image": x})[0]
    assert float(np.abs(out - run_torch(model, x)).mean()) < 1e-3


@pytest.mark.skipif("CUDAExecutionProvider" not in PROVIDERS,
                    reason="no CUDA execution provider (onnxruntime-gpu)")
def test_cuda_fp32_matches_pytorch_fp32(tiny_model: Path, tmp_path: Path) -> None:
    model = checkpoint.load(tiny_model / "model.pt")
    path = export_onnx(model, TINY_MANIFEST, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(4, 1, 64, 64)).astype(np.float32)
    assert float(np.abs(session.run(None, {"image": x})[0] - run_torch(model, x)).mean()) < 1e-4
