from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from optimizer import checkpoint
from optimizer.benchmark import onnx_session, run_onnx, run_torch
from optimizer.errors import CheckpointError, ExportError, QuantizationError
from optimizer.export import export_onnx
from optimizer.quantize import Int8Quantizer
from tests.conftest import TINY_MANIFEST


def quantize_int8(fp32: Path, out: Path, name: str, calib: np.ndarray,
                  method: str = "minmax") -> Path:
    return Int8Quantizer(fp32, out.parent / "work", name, calib).quantize(out, method)


@pytest.fixture(scope="module")
def fp32(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = checkpoint.load(tiny_model / "model.pt")
    return export_onnx(model, TINY_MANIFEST, tmp_path_factory.mktemp("x") / "m.onnx")


def test_export_has_dynamic_batch_and_matches_torch(fp32: Path, tiny_model: Path) -> None:
    graph = onnx.load(str(fp32)).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    x = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    ours = run_onnx(onnx_session(fp32, 1), x)
    ref = run_torch(checkpoint.load(tiny_model / "model.pt"), x)
    assert ours.shape == (3, 1)
    assert float(np.abs(ours - ref).mean()) < 1e-5


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow cannot be exported
            return x.mean(dim=(2, 3))
        return x.amax(dim=(2, 3))


def test_unexportable_model_raises_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"torch\.export could not capture the model"):
        export_onnx(_DataDependent(), TINY_MANIFEST, tmp_path / "bad.onnx")


class _NoOnnxOperator(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.linalg.eigvals(x[0, 0, :4, :4]).real.sum()  # no ONNX translation exists
        return x.mean(dim=(2, 3)) + y


def test_operator_without_onnx_form_is_named_with_its_source_line(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as info:
        export_onnx(_NoOnnxOperator(), TINY_MANIFEST, tmp_path / "bad.onnx")
    message = str(info.value)
    assert "operator aten.linalg_eig has no ONNX translation" in message
    assert "test_export_quantize.py" in message and "torch.linalg.eigvals" in message


def test_int8_is_qdq_per_channel_and_close(fp32: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    calib = rng.normal(size=(8, 1, 64, 64)).astype(np.float32)
    out = quantize_int8(fp32, tmp_path / "m.int8.onnx", "image", calib)
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: i for i in model.graph.initializer}
    per_channel = [
        n for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1
    ]
    assert per_channel, "expected per-channel weight scales"
    x = rng.normal(size=(4, 1, 64, 64)).astype(np.float32)
    q = run_onnx(onnx_session(out, 1), x)
    f = run_onnx(onnx_session(fp32, 1), x)
    assert not np.array_equal(q, f)  # it really is a different computation
    assert float(np.abs(q - f).mean()) < 0.5


def test_quantization_input_errors(fp32: Path, tmp_path: Path) -> None:
    calib = np.zeros((2, 1, 64, 64), np.float32)
    with pytest.raises(QuantizationError, match="unknown calibration method"):
        quantize_int8(fp32, tmp_path / "q.onnx", "image", calib, method="magic")
    with pytest.raises(QuantizationError, match="no calibration inputs"):
        quantize_int8(fp32, tmp_path / "q.onnx", "image", calib[:0])


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "none.pt")
    torch.save({"format": "bedside-checkpoint/1", "architecture": "os.system", "kwargs": {},
                "state_dict": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a network in monai"):
        checkpoint.load(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")


def test_sweep_stops_when_throughput_stops_improving() -> None:
    import time

    from optimizer.benchmark import BenchOptions, sweep

    def make(batch: int):  # type: ignore[no-untyped-def]
        return lambda: time.sleep(0.002 * batch**2)  # batch 2 halves the throughput

    points = sweep(make, BenchOptions(warmup=1, min_runs=3, min_seconds=0.0, max_batch=32))
    assert [p.batch for p in points] == [1, 2]
