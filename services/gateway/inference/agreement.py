"""Agreement between two versions of one model on the same input, per label: for a
classifier, whether both took the same decision and the absolute score difference; for a
segmentation model, the Dice coefficient of the two thresholded masks per class.

Pure functions over two ``Result``s; the metrics and the shadow store are the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from optimizer.contract.manifest import Manifest
from services.gateway.inference.core import Result


@dataclass(frozen=True)
class Agreement:
    """Per label: ``decisions`` (classification: the same positive/negative call),
    ``score_errors`` (classification: |baseline - candidate| score), ``dice`` (segmentation)."""

    decisions: dict[str, bool] = field(default_factory=dict)
    score_errors: dict[str, float] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, float | bool]]:
        return {"decisions": dict(self.decisions), "score_errors": dict(self.score_errors),
                "dice": dict(self.dice)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def compare(manifest: Manifest, baseline: Result, candidate: Result) -> Agreement:
    """How far ``candidate`` (shadow) agrees with ``baseline`` (primary) on one input."""
    if manifest.task == "segmentation":
        if baseline.maps is None or candidate.maps is None \
                or baseline.maps.shape != candidate.maps.shape:
            raise ValueError("segmentation results without maps of one shape")
        per_class = {}
        for k, (label, threshold) in enumerate(zip(manifest.output.labels,
                                                   manifest.output.thresholds, strict=True)):
            per_class[label] = dice(baseline.maps[:, k] >= threshold,
                                    candidate.maps[:, k] >= threshold)
        return Agreement(dice=per_class)
    base = {f["label"]: f for f in baseline.findings}
    cand = {f["label"]: f for f in candidate.findings}
    decisions, errors = {}, {}
    for label in manifest.output.labels:
        b, c = base.get(label), cand.get(label)
        if b is None or c is None:
            continue
        decisions[label] = bool(b["positive"]) == bool(c["positive"])
        errors[label] = abs(float(b["score"]) - float(c["score"]))
    return Agreement(decisions=decisions, score_errors=errors)
