"""Model outputs -> scores -> findings, as the manifest's ``output`` says.

``activate`` is what the optimizer verifies variants on and what the gateway serves, so a score
in a verification report and a score in a result document are the same number; ``findings`` is
the result document's list of labels, scores and decisions at the manifest's thresholds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from optimizer.contract.manifest import Manifest


def activate(outputs: np.ndarray, activation: str) -> np.ndarray:
    """Raw outputs -> scores in [0, 1] as the manifest says."""
    if activation == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-outputs.astype(np.float64))))
    if activation == "softmax":
        # over the class axis: (N, C) scores, or (N, C, ...) maps for segmentation
        axis = 1 if outputs.ndim >= 2 else 0
        shifted = outputs - outputs.max(axis=axis, keepdims=True)
        e = np.exp(shifted.astype(np.float64))
        return np.asarray(e / e.sum(axis=axis, keepdims=True))
    return outputs.astype(np.float64)


def findings(manifest: Manifest, scores: np.ndarray) -> list[dict[str, Any]]:
    """``scores``: (frames, ...) activated outputs; one frame unless the manifest infers every
    frame of a multi-frame instance, where a label's score is its highest.

    Classification: one finding per label (``score``, ``threshold``, ``positive``, and the
    1-based ``frame`` of the highest score when there are several frames). Segmentation: a
    summary per class map (``pixels`` at or above the threshold, their ``fraction``,
    ``max_score``, ``positive`` when any pixel is)."""
    out = manifest.output
    pairs = zip(out.labels, out.thresholds, strict=True)
    if manifest.task == "classification":
        best = scores.max(axis=0)
        found = [{"label": label, "score": round(float(best[k]), 6), "threshold": thr,
                  "positive": bool(best[k] >= thr)}
                 for k, (label, thr) in enumerate(pairs)]
        if scores.shape[0] > 1:
            for k, finding in enumerate(found):
                finding["frame"] = int(scores[:, k].argmax()) + 1  # 1-based, as in DICOM
        return found
    found = []
    for k, (label, thr) in enumerate(pairs):  # segmentation: a summary per class map
        mask = scores[:, k] >= thr
        found.append({"label": label, "threshold": thr, "pixels": int(mask.sum()),
                      "fraction": round(float(mask.mean()), 6),
                      "max_score": round(float(scores[:, k].max()), 6),
                      "positive": bool(mask.any())})
    return found
