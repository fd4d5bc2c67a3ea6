"""INT8 static quantization (QDQ, per-channel weights) calibrated on the model's own inputs,
and the per-node sensitivity ranking that accuracy recovery uses to keep nodes in FP32.

The FP32 graph is prepared once (ONNX Runtime's pre-processing: graph optimisation and shape
inference); every calibration method and every recovery attempt quantizes that same graph, so
node names line up between the ranking and ``nodes_to_exclude``. The QDQ graph is also what a
TensorRT INT8 engine is built from on a GPU node, so calibration happens once, here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from optimizer.errors import QuantizationError
from optimizer.progress import progress

LOG = logging.getLogger(__name__)

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class _DropNoise(logging.Filter):
    """ORT warns once per 1-D weight (BatchNorm scale) that per-channel axis 1 does not apply
    (those are quantized per-tensor) and prints calibration chatter; neither is actionable."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:  # "Created a copy of bias input ...", per tensor
            return False
        return "is out-of-range for weight" not in record.getMessage()


@contextmanager
def _quiet_ort() -> Iterator[None]:
    noise = _DropNoise()
    root = logging.getLogger()
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)


class _ArrayReader(CalibrationDataReader):
    """Feeds preprocessed images one at a time, as serving will see them."""

    def __init__(self, input_name: str, inputs: np.ndarray) -> None:
        self._name = input_name
        self._inputs = inputs
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._inputs):
            return None
        item = self._inputs[self._i : self._i + 1]
        self._i += 1
        return {self._name: item}

    def rewind(self) -> None:
        self._i = 0


@dataclass(frozen=True)
class NodeSensitivity:
    """Output error (MAE vs FP32) when this group of consecutive nodes alone is quantized."""

    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    mae: float


class Int8Quantizer:
    """Quantizes one FP32 graph, with any calibration method and any nodes kept in FP32.

    Calibration ranges are cached per method, so recovery attempts after the first cost a
    graph rewrite, not a calibration pass.
    """

    def __init__(self, fp32_path: Path, workdir: Path, input_name: str,
                 calibration: np.ndarray) -> None:
        if len(calibration) == 0:
            raise QuantizationError("no calibration inputs")
        self._input = input_name
        self._calibration = calibration
        self._workdir = workdir
        if workdir.exists():  # calibration caches of an earlier run must never be reused
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        self.prepared = workdir / "model.prep.onnx"
        try:
            with _quiet_ort():
                quant_pre_process(str(fp32_path), str(self.prepared), skip_symbolic_shape=True)
        except Exception as exc:  # ORT raises bare exceptions
            raise QuantizationError(f"INT8 pre-processing failed: {exc}") from exc
        self.nodes = [(n.name, n.op_type) for n in onnx.load(str(self.prepared)).graph.node]

    def quantize(self, out_path: Path, method: str = "minmax", exclude: Sequence[str] = (),
                 only: Sequence[str] | None = None) -> Path:
        """U8 activations / S8 per-channel weights in QDQ form (fast on x86 VNNI/AVX2)."""
        if method not in METHODS:
            raise QuantizationError(f"unknown calibration method {method!r}: {sorted(METHODS)}")
        try:
            with _quiet_ort(), contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(self.prepared), str(out_path),
                    _ArrayReader(self._input, self._calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=METHODS[method], nodes_to_exclude=list(exclude),
                    nodes_to_quantize=list(only) if only is not None else None,
                    calibration_cache_path=str(self._workdir / f"calibration.{method}.cache"),
                )
        except Exception as exc:
            raise QuantizationError(f"INT8 quantization ({method}) failed: {exc}") from exc
        LOG.debug("quantized %s (%s, %d nodes kept in FP32)", out_path.name, method,
                  len(exclude))
        return out_path

    def rank_nodes(self, method: str, samples: np.ndarray, golden: np.ndarray,
                   run: Callable[[Path, np.ndarray], np.ndarray],
                   max_probes: int = 128) -> list[NodeSensitivity]:
        """Quantize one group of consecutive nodes at a time (one node per group on graphs of
        up to ``max_probes`` nodes) and measure the output error each group alone causes.

        The cost is at most ``max_probes`` quantizations whatever the graph's size.
        """
        probe = self._workdir / "probe.onnx"
        size = -(-len(self.nodes) // max_probes)  # ceil
        groups = [self.nodes[i : i + size] for i in range(0, len(self.nodes), size)]
        ranked = []
        for group in progress(groups, "INT8 sensitivity", unit="probe"):
            self.quantize(probe, method, only=[name for name, _ in group])
            err = float(np.abs(run(probe, samples) - golden).mean())
            if err > 0.0:
                ranked.append(NodeSensitivity(nodes=tuple(n for n, _ in group),
                                              op_types=tuple(t for _, t in group), mae=err))
        probe.unlink(missing_ok=True)
        return sorted(ranked, key=lambda n: n.mae, reverse=True)
