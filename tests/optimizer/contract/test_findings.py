"""Findings from activated scores at the manifest's thresholds."""

from __future__ import annotations

import dataclasses

import numpy as np

from optimizer.contract.findings import activate, findings
from tests.conftest import TINY_MANIFEST

TWO_LABELS = dataclasses.replace(TINY_MANIFEST, output=dataclasses.replace(
    TINY_MANIFEST.output, labels=("lesion", "effusion"), thresholds=(0.5, 0.3)))


def test_classification_takes_each_labels_highest_frame() -> None:
    scores = np.array([[0.2, 0.1], [0.7, 0.05], [0.4, 0.25]])  # 3 frames, 2 labels
    assert findings(TWO_LABELS, scores) == [
        {"label": "lesion", "score": 0.7, "threshold": 0.5, "positive": True, "frame": 2},
        {"label": "effusion", "score": 0.25, "threshold": 0.3, "positive": False, "frame": 3},
    ]
    one = findings(TWO_LABELS, scores[:1])
    assert [f["positive"] for f in one] == [False, False] and "frame" not in one[0]


def test_segmentation_summarises_each_class_map() -> None:
    manifest = dataclasses.replace(TWO_LABELS, task="segmentation")
    maps = np.zeros((1, 2, 4, 4))
    maps[0, 0, :2, :] = 0.9  # 8 of 16 pixels over 0.5
    maps[0, 1] = 0.2  # nothing reaches 0.3
    lesion, effusion = findings(manifest, maps)
    assert lesion == {"label": "lesion", "threshold": 0.5, "pixels": 8, "fraction": 0.5,
                      "max_score": 0.9, "positive": True}
    assert effusion["pixels"] == 0 and effusion["positive"] is False
    assert effusion["max_score"] == 0.2


def test_findings_follow_the_manifests_activation() -> None:
    raw = np.array([[0.0, 2.0]])
    assert findings(TWO_LABELS, activate(raw, "sigmoid"))[0]["score"] == 0.5
    softmax = activate(raw, "softmax")
    np.testing.assert_allclose(softmax.sum(axis=1), 1.0)
    assert softmax[0, 1] > softmax[0, 0]
