from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from optimizer.contract.findings import activate
from optimizer.contract.manifest import AccuracyBudget
from optimizer.verify import roc_auc, tuning_split, verify, with_held_out
from tests.conftest import TINY_MANIFEST


def _brute_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = list(itertools.product(pos, neg))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding creates ties
    assert roc_auc(labels, scores) == pytest.approx(_brute_auc(labels, scores))
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        roc_auc(np.ones(4), np.arange(4.0))


def _case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    labels = np.tile([0, 1], 100)
    golden = (rng.normal(0, 1, 200) + 2.0 * labels).astype(np.float32)[:, None]
    return labels, golden


def test_identical_outputs_pass() -> None:
    labels, golden = _case()
    result = verify("fp32", golden.copy(), golden, labels, TINY_MANIFEST)
    assert result.passed and result.mae == 0.0 and result.agreement == 1.0


def test_small_error_fails_fp32_tolerance_but_not_int8() -> None:
    labels, golden = _case()
    noisy = golden + 1e-3
    assert not verify("fp32", noisy, golden, labels, TINY_MANIFEST).passed
    assert verify("int8", noisy, golden, labels, TINY_MANIFEST).passed


def test_task_metric_budget_is_enforced() -> None:
    labels, golden = _case()
    strict = dataclasses.replace(
        TINY_MANIFEST, accuracy_budget=AccuracyBudget(max_auc_drop=0.001, min_agreement=0.99))
    damaged = golden.copy()
    damaged[np.where(labels == 1)[0][:40]] = -5.0  # flip 40 positives into confident negatives
    result = verify("int8", damaged, golden, labels, strict, mae_tolerance=10.0)
    assert not result.passed
    assert result.metric == "auc" and result.metric_delta < -0.001
    assert any("AUC drop" in r for r in result.reasons)
    assert any("agreement" in r for r in result.reasons)


def test_non_finite_outputs_fail() -> None:
    labels, golden = _case()
    broken = golden.copy()
    broken[3, 0] = np.nan
    result = verify("int8", broken, golden, labels, TINY_MANIFEST, mae_tolerance=10.0)
    assert not result.passed and "non-finite" in result.reasons[0]


def test_softmax_auc_is_one_vs_rest() -> None:
    labels = np.tile([0, 1], 50)
    rng = np.random.default_rng(5)
    logit1 = rng.normal(0, 1, 100) + 1.5 * labels
    golden = np.stack([-logit1, logit1], axis=1).astype(np.float32)
    better = golden.copy()
    better[:, 1] += 0.5 * labels  # the variant separates the classes slightly better
    better[:, 0] -= 0.5 * labels
    softmax = dataclasses.replace(TINY_MANIFEST, output=dataclasses.replace(
        TINY_MANIFEST.output, labels=("normal", "lesion"), activation="softmax",
        thresholds=(0.5, 0.5)))
    result = verify("int8", better, golden, labels, softmax, mae_tolerance=10.0)
    assert result.metric_delta >= 0.0  # an improvement is never reported as a loss


def test_multi_label_sigmoid_with_one_label_column_is_refused() -> None:
    labels, golden = _case()
    two = np.concatenate([golden, golden], axis=1)
    multi = dataclasses.replace(TINY_MANIFEST, output=dataclasses.replace(
        TINY_MANIFEST.output, labels=("a", "b"), thresholds=(0.5, 0.5)))
    with pytest.raises(ValueError, match="one label column per"):
        verify("fp32", two, two, labels, multi)


def test_softmax_normalises_over_the_class_axis_of_segmentation_maps() -> None:
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 3, 4, 5))  # (batch, classes, height, width)
    probs = activate(maps, "softmax")
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert not np.allclose(probs.sum(axis=-1), 1.0)
    scores = activate(maps[:, :, 0, 0], "softmax")  # classification (batch, classes)
    np.testing.assert_allclose(scores, probs[:, :, 0, 0])


def test_tuning_split_halves_the_set_and_keeps_every_class_in_both_halves() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 0])
    tune, held = tuning_split(labels)
    assert sorted([*tune, *held]) == list(range(10)) and not set(tune) & set(held)
    assert abs(len(tune) - len(held)) <= 1
    for half in (tune, held):
        assert set(labels[half]) == {0, 1}
    masks = np.zeros((5, 1, 4, 4))  # segmentation: file order, alternating
    assert [list(h) for h in tuning_split(masks)] == [[0, 2, 4], [1, 3]]


def test_a_variant_good_only_on_its_tuning_half_fails_on_the_held_out_half() -> None:
    labels, golden = _case()
    _, held = tuning_split(labels)
    outputs = golden.copy()
    outputs[held] += 0.2  # wrong only where the tuning did not look
    full = verify("int8", outputs, golden, labels, TINY_MANIFEST, mae_tolerance=0.15)
    assert full.passed  # the whole set's MAE (0.1) hides it
    judged = with_held_out(full, outputs, golden, labels, TINY_MANIFEST, held)
    assert not judged.passed
    assert any(r.startswith("on the held-out half (100 items") and "MAE" in r
               for r in judged.reasons)
    fine = with_held_out(full, golden.copy(), golden, labels, TINY_MANIFEST, held)
    assert fine == full
