"""PyTorch -> ONNX with a dynamic batch axis, checked and shape-inferred."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx
import torch
from torch import nn

from optimizer.errors import ExportError
from optimizer.manifest import Manifest

LOG = logging.getLogger(__name__)
OPSET = 20
MAX_BATCH = 64


def export_onnx(model: nn.Module, manifest: Manifest, path: Path) -> Path:
    """Export through torch.export (the supported exporter), then run the ONNX checker.

    Input and output names come from the manifest so Triton, the gateway and ONNX agree.
    """
    if not isinstance(model, torch.fx.GraphModule):  # unlifted exported programs have no eval()
        model.eval()
    sample = torch.zeros((1, *manifest.input.shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    noise = io.StringIO()
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, torch.jit.ScriptModule):
        _export_torchscript(model, manifest, sample, path)
        return _check(path)
    try:
        with contextlib.redirect_stdout(noise):
            program = torch.onnx.export(
                model,
                (sample,),
                input_names=[manifest.input.name],
                output_names=[manifest.output.name],
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises a zoo of types; the message names the op
        raise ExportError(f"ONNX export failed: {exc}") from exc
    if program is None:
        raise ExportError("ONNX export produced no program")
    program.save(str(path))
    return _check(path)


def _export_torchscript(model: torch.jit.ScriptModule, manifest: Manifest,
                        sample: torch.Tensor, path: Path) -> None:
    """TorchScript cannot go through torch.export; the TorchScript-based exporter takes it."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model, (sample,), str(path), input_names=[manifest.input.name],
                output_names=[manifest.output.name], opset_version=OPSET, dynamo=False,
                dynamic_axes={manifest.input.name: {0: "batch"},
                              manifest.output.name: {0: "batch"}},
            )
    except Exception as exc:
        raise ExportError(f"ONNX export of the TorchScript model failed: {exc}") from exc


def _check(path: Path) -> Path:
    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    except Exception as exc:
        raise ExportError(f"exported graph is not valid ONNX: {exc}") from exc
    onnx.save(inferred, str(path))
    LOG.info("exported %s (%d nodes)", path.name, len(inferred.graph.node))
    return path
