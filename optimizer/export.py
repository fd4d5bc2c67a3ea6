"""PyTorch -> ONNX with a dynamic batch axis, checked and shape-inferred."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import onnx
import torch
from torch import nn

from optimizer.contract.manifest import Manifest
from optimizer.errors import ExportError

LOG = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
OPSET = 20
MAX_BATCH = 64


def export_onnx(model: nn.Module, manifest: Manifest, path: Path) -> Path:
    """Export through torch.export (the supported exporter), then run the ONNX checker.

    Input and output names come from the manifest so Triton, the gateway and ONNX agree.
    """
    if not isinstance(model, torch.fx.GraphModule):  # unlifted exported programs have no eval()
        model.eval()
    # batch 2: torch.export specialises dimensions of size 1, which would pin the batch axis
    sample = torch.zeros((2, *manifest.input.shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    noise = io.StringIO()
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, torch.jit.ScriptModule):
        _export_torchscript(model, manifest, sample[:1], path)
        return _check(path)
    # Two stages, so that a failure names what failed: torch.export (Python control flow,
    # unsupported constructs) first, then the ONNX translation (operators with no ONNX form).
    try:
        exported = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.export could not capture the model: {first}") from exc
    try:
        with contextlib.redirect_stdout(noise):
            program = torch.onnx.export(
                exported,
                input_names=[manifest.input.name],
                output_names=[manifest.output.name],
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(_describe_onnx_failure(str(exc), exported)) from exc
    if program is None:
        raise ExportError("ONNX export produced no program")
    program.save(str(path))
    return _check(path)


def _describe_onnx_failure(message: str, exported: torch.export.ExportedProgram) -> str:
    """Name the operator without an ONNX translation and the model code it came from."""
    op = re.search(r"op='([^']+)'", message)
    node = re.search(r"translating node %(\w+)", message)
    if not op:
        return f"ONNX export failed: {_ANSI.sub('', message).strip().splitlines()[0]}"
    where = "unknown location"
    short = op.group(1).split(".")[-1]
    # exact node first; the exporter decomposes before translating, so fall back to the
    # original node whose operator contains the failing one (linalg_eigvals -> linalg_eig)
    for match in (lambda n: node is not None and n.name == node.group(1),
                  lambda n: short in str(n.target)):
        found = next((n for n in exported.graph.nodes
                      if match(n) and n.meta.get("stack_trace")), None)
        if found is not None:
            lines = [ln.strip() for ln in found.meta["stack_trace"].strip().splitlines()]
            where = " / ".join(lines[-2:])
            break
    return (f"ONNX export failed: operator {op.group(1)} has no ONNX translation "
            f"(node {node.group(1) if node else '?'}, at {where})")


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
