"""OpenVINO INT8 by NNCF: post-training quantization calibrated on the manifest-preprocessed
calibration DICOMs, and, when that misses the budget, NNCF's accuracy-controlled quantization.

Accuracy control is the OpenVINO counterpart of optimizer.quantize's recovery: NNCF ranks
groups of quantizers by how much they hurt a validation metric and reverts the worst to
floating point, one group per iteration, until the metric is within ``max_drop`` or the
iteration bound is reached. The metric it is driven by is Bedside's own pass criterion on the
labelled validation set: every gate of optimizer.verify (MAE against the PyTorch golden
outputs, the task metric's drop, decision agreement) as a share of what that gate allows; the
worst share is the score, so "within budget" means what verification means. The result is
still verified by optimizer.verify like every other variant: accuracy control can stop at its
bound without passing, and the variant then fails with the reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optimizer.contract.findings import activate
from optimizer.contract.manifest import Manifest
from optimizer.errors import QuantizationError
from optimizer.ov_runtime import nncf, openvino
from optimizer.verify import verify

LOG = logging.getLogger(__name__)

# Ops whose INT8 form matters for speed: those that read a FakeQuantize output.
_COMPUTE_OPS = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


def _share(used: float, allowed: float) -> float:
    """How much of a gate's allowance ``used`` takes (1.0 = at the limit)."""
    if used <= 0.0:
        return 0.0
    return used / allowed if allowed > 0.0 else 1e6


def gate_score(outputs: np.ndarray, golden: np.ndarray, labels: np.ndarray,
               manifest: Manifest, mae_tolerance: float) -> float:
    """The worst gate's share of its allowance (lower is better; <= 1.0 passes).

    On a subset where the task metric is undefined (one item, or one class only: NNCF ranks on
    subsets and validates item by item) only MAE and decision agreement count.
    """
    budget = manifest.accuracy_budget
    try:
        check = verify("int8", outputs, golden, labels, manifest, mae_tolerance=mae_tolerance)
    except ValueError:  # AUC needs both classes
        err = float(np.abs(outputs.astype(np.float64) - golden.astype(np.float64)).mean())
        act = manifest.output.activation
        k = len(manifest.output.labels)
        thr = np.asarray(manifest.output.thresholds).reshape((1, k) + (1,) * (outputs.ndim - 2))
        agree = float(min(((activate(outputs, act) >= thr)[:, i]
                           == (activate(golden, act) >= thr)[:, i]).mean() for i in range(k)))
        return max(_share(err, mae_tolerance), _share(1.0 - agree, 1.0 - budget.min_agreement))
    if not np.isfinite(check.mae):
        return 1e6
    allowed = budget.max_auc_drop if check.metric == "auc" else budget.max_dice_drop
    return max(_share(check.mae, mae_tolerance), _share(-check.metric_delta, allowed),
               _share(1.0 - check.agreement, 1.0 - budget.min_agreement))


@dataclass
class AccuracyControl:
    """What NNCF's accuracy control did: reverted ops, the bound, and whether it got there."""

    max_iterations: int
    reverted_ops: list[str] = field(default_factory=list)
    score_plain: float = float("nan")
    score_final: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"max_iterations": self.max_iterations, "fp32_ops": self.reverted_ops,
                "score_plain": round(self.score_plain, 4),
                "score_final": round(self.score_final, 4),
                "score_meaning": "worst verification gate as a share of its allowance "
                                 "(<= 1 passes)"}


def quantized_ops(model: Any) -> set[str]:
    """Names of the compute ops that read a FakeQuantize output (they run in INT8)."""
    found = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() not in _COMPUTE_OPS:
            continue
        if any(port.get_source_output().get_node().get_type_name() == "FakeQuantize"
               for port in op.inputs()):
            found.add(op.get_friendly_name())
    return found


class OvInt8:
    """NNCF quantization of one OpenVINO model (read from the exported FP32 ONNX)."""

    def __init__(self, model: Any, calibration: np.ndarray) -> None:
        if len(calibration) == 0:
            raise QuantizationError("no calibration inputs")
        self._model = model
        self._nncf = nncf()
        self._calibration = self._nncf.Dataset(
            list(range(len(calibration))), lambda i: calibration[i : i + 1])
        self._subset = len(calibration)

    def quantize(self) -> Any:
        try:
            return self._nncf.quantize(self._model, self._calibration, subset_size=self._subset)
        except Exception as exc:  # NNCF raises its own and OpenVINO's exception types
            raise QuantizationError(f"NNCF quantization failed: {exc}") from exc

    def accuracy_controlled(self, plain: Any, inputs: np.ndarray, golden: np.ndarray,
                            labels: np.ndarray, manifest: Manifest, mae_tolerance: float,
                            max_fraction: float) -> tuple[Any, AccuracyControl]:
        """Quantize with accuracy control; at most ``max_fraction`` of the INT8 compute ops
        (one quantizer group per iteration) may be reverted to floating point."""
        ov = openvino()

        def validate(compiled: Any, items: Iterable[int]) -> float:
            idx = np.fromiter(items, dtype=np.int64)
            request = compiled.create_infer_request()
            out = np.concatenate([np.array(request.infer([inputs[i : i + 1]])[
                compiled.output(0)], copy=True) for i in idx]).astype(np.float32)
            # NNCF maximises its metric: the negated gate score
            return -gate_score(out, golden[idx], labels[idx], manifest, mae_tolerance)

        plain_ops = quantized_ops(plain)
        control = AccuracyControl(max_iterations=max(1, int(len(plain_ops) * max_fraction)))
        validation = self._nncf.Dataset(list(range(len(inputs))))
        params = self._nncf.quantization.advanced_parameters.AdvancedAccuracyRestorerParameters(
            max_num_iterations=control.max_iterations, num_ranking_workers=1)
        try:
            model = self._nncf.quantize_with_accuracy_control(
                self._model, self._calibration, validation, validate,
                max_drop=1.0, drop_type=self._nncf.DropType.ABSOLUTE,
                subset_size=self._subset, advanced_accuracy_restorer_parameters=params)
        except Exception as exc:
            raise QuantizationError(f"NNCF accuracy-controlled quantization failed: {exc}") \
                from exc
        control.reverted_ops = sorted(plain_ops - quantized_ops(model))
        f32 = {"INFERENCE_PRECISION_HINT": "f32"}
        control.score_plain = -validate(ov.Core().compile_model(plain, "CPU", f32),
                                        range(len(inputs)))
        control.score_final = -validate(ov.Core().compile_model(model, "CPU", f32),
                                        range(len(inputs)))
        return model, control
