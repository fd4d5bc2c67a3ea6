"""Model inputs other than Bedside checkpoints: TorchScript and exported programs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from optimizer import checkpoint
from optimizer.benchmark import onnx_session, run_onnx, run_torch
from optimizer.export import export_onnx
from tests.conftest import TINY_MANIFEST


@pytest.fixture(scope="module")
def module(tiny_model: Path) -> torch.nn.Module:
    return checkpoint.load(tiny_model / "model.pt")


def _roundtrip(path: Path, out: Path) -> float:
    model = checkpoint.load(path)
    onnx_path = export_onnx(model, TINY_MANIFEST, out)
    x = np.random.default_rng(3).normal(size=(3, 1, 64, 64)).astype(np.float32)
    return float(np.abs(run_onnx(onnx_session(onnx_path, 1), x) - run_torch(model, x)).max())


def test_torchscript_model_exports_with_dynamic_batch(module: torch.nn.Module,
                                                     tmp_path: Path) -> None:
    scripted = torch.jit.trace(module, torch.zeros(1, 1, 64, 64))
    torch.jit.save(scripted, str(tmp_path / "model.ts"))
    assert isinstance(checkpoint.load(tmp_path / "model.ts"), torch.jit.ScriptModule)
    assert _roundtrip(tmp_path / "model.ts", tmp_path / "ts.onnx") < 1e-4


def test_exported_program_exports_with_dynamic_batch(module: torch.nn.Module,
                                                     tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(module, (torch.zeros(2, 1, 64, 64),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    assert _roundtrip(tmp_path / "model.pt2", tmp_path / "ep.onnx") < 1e-4


def test_bad_exported_program_is_a_checkpoint_error(tmp_path: Path) -> None:
    from optimizer.errors import CheckpointError

    (tmp_path / "bad.pt2").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="exported program"):
        checkpoint.load(tmp_path / "bad.pt2")
