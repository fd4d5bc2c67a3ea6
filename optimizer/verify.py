"""Verification of a variant against the PyTorch golden outputs: numbers, then the task metric."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from optimizer.contract.findings import activate
from optimizer.contract.manifest import Manifest

# The ladder, scale-aware: a variant's mean absolute error on the raw outputs, divided by the
# spread (standard deviation) of the PyTorch FP32 reference outputs, must stay under its
# precision's rung. Relative to the spread, so that a model whose outputs vary by 1e-14 (a
# random EfficientNet) is not passed by any MAE, and one whose logits vary by tens is not
# failed for the last bits of FP32. FP32 is 1e-4 of the spread: an exact export reorders sums
# (a 2-D SegResNet's differs by 1.5e-5 absolute), which is still 500x tighter than INT8. BF16
# keeps FP32's range with an 8-bit significand: between FP16 and INT8.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 1e-2, "int8": 0.05}
# The seed ladder in absolute MAE (DESIGN.md), for outputs with a spread of about 1: applied
# when the reference outputs have no spread to be relative to (constant outputs), and the
# meaning of an explicit --mae-tolerance, which is always absolute.
MAE_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2, "int8": 0.05}
# Below this spread, relative to the outputs' largest magnitude, the
# reference outputs count as constant.
_FLAT = 1e-12


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative examples")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(sorted_scores):
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice over the whole set (both empty counts as perfect agreement)."""
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


@dataclass(frozen=True)
class Verification:
    """How one variant compares with PyTorch FP32 on the labelled validation set.

    ``metric`` is the task metric: ``auc`` (classification) or ``dice`` (segmentation);
    ``metric_delta`` is variant minus reference on the worst label (negative = lost accuracy).
    """

    precision: str
    mae: float
    max_abs: float
    mae_tolerance: float
    metric: str
    metric_value: float
    metric_reference: float
    metric_delta: float
    agreement: float
    passed: bool
    reasons: tuple[str, ...]
    reference_spread: float = float("nan")  # std of the PyTorch FP32 outputs
    relative_mae: float | None = None  # mae / reference_spread, where that is the rule
    rule: str = ""  # which rule judged the MAE, in words (the report's "tolerance_rule")

    @property
    def mae_ceiling(self) -> float:
        """The absolute MAE this variant had to stay under, whichever rule set it."""
        if self.rule.startswith("relative"):
            return self.mae_tolerance * self.reference_spread
        return self.mae_tolerance


def _task_metrics(
    scores: np.ndarray, ref_scores: np.ndarray, labels: np.ndarray, manifest: Manifest
) -> tuple[str, list[float], list[float], float, float]:
    """(metric name, per-label values, per-label references, agreement, allowed drop)."""
    out = manifest.output
    k = len(out.labels)
    thr = np.asarray(out.thresholds).reshape((1, k) + (1,) * (scores.ndim - 2))
    decisions, ref_decisions = scores >= thr, ref_scores >= thr
    agreement = float(min((decisions[:, i] == ref_decisions[:, i]).mean() for i in range(k)))
    if manifest.task == "classification":
        if k > 1 and out.activation != "softmax":
            raise ValueError("multi-label (sigmoid) classification needs one label column per "
                             "output; labels.csv has one: use softmax with class indices")
        # one-vs-rest per class: class i positive where the label is i (binary: i == 1)
        truth = [labels == i for i in range(k)] if k > 1 else [labels == 1]
        values = [roc_auc(truth[i], scores[:, i]) for i in range(k)]
        refs = [roc_auc(truth[i], ref_scores[:, i]) for i in range(k)]
        return "auc", values, refs, agreement, manifest.accuracy_budget.max_auc_drop
    values = [dice(decisions[:, i], labels[:, i] > 0) for i in range(k)]
    refs = [dice(ref_decisions[:, i], labels[:, i] > 0) for i in range(k)]
    return "dice", values, refs, agreement, manifest.accuracy_budget.max_dice_drop


def verify(
    precision: str,
    outputs: np.ndarray,
    golden: np.ndarray,
    labels: np.ndarray,
    manifest: Manifest,
    mae_tolerance: float | None = None,
) -> Verification:
    """Pass only if the numbers are within tolerance AND the task metric is within budget.

    Decision agreement is measured at the manifest's thresholds (per instance for
    classification, per pixel for segmentation), label by label, worst label reported.
    """
    if outputs.shape != golden.shape:
        raise ValueError(f"output shape {outputs.shape} != golden shape {golden.shape}")
    spread = float(np.std(golden.astype(np.float64)))
    magnitude = float(np.abs(golden.astype(np.float64)).max(initial=0.0))
    relative = mae_tolerance is None and spread > _FLAT * magnitude
    if mae_tolerance is not None:
        tol = mae_tolerance
        rule = f"absolute: MAE < {tol:g} (--mae-tolerance {precision}={tol:g})"
    elif relative:
        tol = RELATIVE_TOLERANCE[precision]
        rule = (f"relative: MAE / std of the reference outputs ({spread:.3g}) < {tol:g} "
                f"({precision} rung)")
    else:
        tol = MAE_TOLERANCE[precision]
        rule = (f"absolute: MAE < {tol:g} ({precision} seed rung; the reference outputs are "
                f"constant, std {spread:.3g}, nothing to be relative to)")
    metric_name = "auc" if manifest.task == "classification" else "dice"
    if not np.isfinite(outputs).all():
        nonfinite = int((~np.isfinite(outputs)).sum())
        return Verification(
            precision=precision, mae=float("inf"), max_abs=float("inf"), mae_tolerance=tol,
            metric=metric_name, metric_value=float("nan"), metric_reference=float("nan"),
            metric_delta=float("-inf"), agreement=0.0, passed=False,
            reasons=(f"{nonfinite} non-finite outputs (overflow or NaN)",),
            reference_spread=spread, relative_mae=None, rule=rule,
        )
    err = np.abs(outputs.astype(np.float64) - golden.astype(np.float64))
    mae, max_abs = float(err.mean()), float(err.max())
    act = manifest.output.activation
    scores, ref_scores = activate(outputs, act), activate(golden, act)
    name, values, refs, agreement, allowed = _task_metrics(scores, ref_scores, labels, manifest)
    deltas = [v - r for v, r in zip(values, refs, strict=True)]
    worst = int(np.argmin(deltas))
    reasons = []
    rel = mae / spread if relative else None
    if rel is not None and not rel < tol:
        reasons.append(f"MAE {mae:.3g} is {rel:.3g} of the reference outputs' spread "
                       f"(std {spread:.3g}) >= tolerance {tol:g}")
    elif rel is None and not mae < tol:
        reasons.append(f"MAE {mae:.3g} >= tolerance {tol:g}")
    if -deltas[worst] > allowed:
        reasons.append(
            f"{name.upper()} drop {-deltas[worst]:.4f} on '{manifest.output.labels[worst]}' "
            f"exceeds budget {allowed:g}"
        )
    if agreement < manifest.accuracy_budget.min_agreement:
        reasons.append(
            f"decision agreement {agreement:.4f} < {manifest.accuracy_budget.min_agreement:g}")
    return Verification(
        precision=precision, mae=mae, max_abs=max_abs, mae_tolerance=tol, metric=name,
        metric_value=values[worst], metric_reference=refs[worst], metric_delta=deltas[worst],
        agreement=agreement, passed=not reasons, reasons=tuple(reasons),
        reference_spread=spread, relative_mae=rel, rule=rule,
    )


def tuning_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the tuning half and the held-out half of a validation set.

    Accuracy recovery (ONNX INT8) and accuracy control (OpenVINO) tune on the first half; the
    variant they produce must then also pass on the second, which they never saw. Items
    alternate between the halves in label order for classification (so that each half holds
    every class the set holds, where it holds two of it) and in file order for segmentation.
    """
    n = len(labels)
    if labels.ndim <= 2:  # classification: (N,) or (N, K) labels
        keys = labels.reshape(n, -1).T[::-1]
        order = np.lexsort(keys) if keys.size else np.arange(n)
    else:
        order = np.arange(n)
    return np.sort(order[0::2]), np.sort(order[1::2])


def verify_subset(base: Verification, outputs: np.ndarray, golden: np.ndarray,
                  labels: np.ndarray, manifest: Manifest, idx: np.ndarray) -> tuple[str, ...]:
    """Why the items ``idx`` fail ``base``'s gates (empty when they pass): the same absolute
    MAE ceiling, task-metric budget and agreement floor as ``base``, on a part of the set."""
    try:
        part = verify(base.precision, outputs[idx], golden[idx], labels[idx], manifest,
                      mae_tolerance=base.mae_ceiling)
    except ValueError as exc:  # e.g. one class only: AUC is undefined
        return (f"its task metric cannot be judged on these {len(idx)} items ({exc})",)
    return part.reasons


def with_held_out(full: Verification, outputs: np.ndarray, golden: np.ndarray,
                  labels: np.ndarray, manifest: Manifest, held: np.ndarray) -> Verification:
    """``full`` (the whole validation set) also judged on the held-out half a tuned variant
    never saw: it passes only where both pass, and says which half failed."""
    failed = verify_subset(full, outputs, golden, labels, manifest, held)
    if not failed:
        return full
    prefix = f"on the held-out half ({len(held)} items the tuning did not see): "
    return replace(full, passed=False, reasons=full.reasons + tuple(prefix + r for r in failed))
