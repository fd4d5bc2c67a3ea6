"""Verification of a variant against the PyTorch golden outputs: numbers, then the task metric."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optimizer.contract.findings import activate
from optimizer.contract.manifest import Manifest

# Mean absolute error ceilings on the raw model outputs, per precision (DESIGN.md ladder).
# BF16 keeps FP32's range with an 8-bit significand (about 2-3 decimal digits): between FP16
# and INT8 on the ladder.
MAE_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2, "int8": 0.05}


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
    tol = MAE_TOLERANCE[precision] if mae_tolerance is None else mae_tolerance
    metric_name = "auc" if manifest.task == "classification" else "dice"
    if not np.isfinite(outputs).all():
        nonfinite = int((~np.isfinite(outputs)).sum())
        return Verification(
            precision=precision, mae=float("inf"), max_abs=float("inf"), mae_tolerance=tol,
            metric=metric_name, metric_value=float("nan"), metric_reference=float("nan"),
            metric_delta=float("-inf"), agreement=0.0, passed=False,
            reasons=(f"{nonfinite} non-finite outputs (overflow or NaN)",),
        )
    err = np.abs(outputs.astype(np.float64) - golden.astype(np.float64))
    mae, max_abs = float(err.mean()), float(err.max())
    act = manifest.output.activation
    scores, ref_scores = activate(outputs, act), activate(golden, act)
    name, values, refs, agreement, allowed = _task_metrics(scores, ref_scores, labels, manifest)
    deltas = [v - r for v, r in zip(values, refs, strict=True)]
    worst = int(np.argmin(deltas))
    reasons = []
    if not mae < tol:
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
    )
