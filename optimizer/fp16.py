"""FP16 variant: weights and compute in half precision, numerically sensitive ops kept in FP32.

Normalisation statistics, exponentials and reductions overflow or lose precision in FP16; they
stay in FP32 behind casts. With ``keep_io_types`` the model still takes and returns FP32, so
callers (the gateway, Triton's config) need not change.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from optimizer.errors import QuantizationError

LOG = logging.getLogger(__name__)

SENSITIVE_OPS = (
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div", "ReduceMean",
    "ReduceSum", "ReduceL2", "InstanceNormalization", "LayerNormalization", "Erf", "Range",
    "RandomNormalLike", "Resize", "Upsample",
)


def _drop_duplicate_nodes(graph: onnx.GraphProto) -> None:
    """When one FP32 initializer feeds several blocked nodes, the converter inserts the same
    Cast once per consumer under one output name; keep the first, which is identical."""
    seen: set[str] = set()
    kept = []
    for node in graph.node:
        if node.op_type == "Cast" and node.output and node.output[0] in seen:
            continue
        seen.update(node.output)
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """The converter appends its I/O casts at the end of the node list; ONNX wants producers
    before consumers, so reorder in place (Kahn's algorithm, stable for the original order)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise QuantizationError("FP16 graph has a cycle or a dangling input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(fp32_path: Path, out_path: Path, keep_io_types: bool = True) -> Path:
    try:
        model = onnx.load(str(fp32_path))
        half = convert_float_to_float16(model, keep_io_types=keep_io_types,
                                        op_block_list=list(SENSITIVE_OPS))
        _drop_duplicate_nodes(half.graph)
        _topological_sort(half.graph)
        onnx.checker.check_model(half)
        onnx.save(half, str(out_path))
    except Exception as exc:  # the converter raises bare exceptions
        raise QuantizationError(f"FP16 conversion failed: {exc}") from exc
    LOG.info("converted %s to FP16 (I/O kept in FP32: %s)", out_path.name, keep_io_types)
    return out_path
