"""Issue 15 (2): the tolerance ladder relative to the reference outputs' spread; the absolute
seed figures where there is no spread, and for an explicit --mae-tolerance; each variant says
which rule judged it."""

from __future__ import annotations

import numpy as np

from optimizer.verify import MAE_TOLERANCE, RELATIVE_TOLERANCE, verify
from tests.conftest import TINY_MANIFEST


def _labels_and_golden(scale: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = np.tile([0, 1], 50)
    golden = ((rng.normal(0, 1, 100) + 2.0 * labels) * scale).astype(np.float64)[:, None]
    return labels, golden


def test_tiny_outputs_no_longer_pass_any_error() -> None:
    """A random EfficientNet's outputs vary by ~1e-14: an error as large as the outputs
    themselves passed the absolute ladder; relative to their spread it fails."""
    labels, golden = _labels_and_golden(1e-14)
    garbage = golden[::-1].copy()  # every output wrong by about the outputs' own size
    result = verify("int8", garbage, golden, labels, TINY_MANIFEST)
    assert result.mae < MAE_TOLERANCE["fp32"]  # what the absolute ladder would have passed
    assert not result.passed and "of the reference outputs' spread" in result.reasons[0]
    assert result.rule.startswith("relative") and result.relative_mae is not None
    assert result.relative_mae > RELATIVE_TOLERANCE["int8"]


def test_large_outputs_pass_fp32_reordering_error() -> None:
    """Logits that vary by tens: an exact FP32 export's reordering error of 1.5e-5 failed the
    absolute 1e-5; relative to the spread it is far inside the FP32 rung."""
    labels, golden = _labels_and_golden(20.0)
    reordered = golden + 1.5e-5 * np.sign(np.sin(np.arange(len(golden))))[:, None]
    result = verify("fp32", reordered, golden, labels, TINY_MANIFEST)
    assert result.mae > MAE_TOLERANCE["fp32"]  # the absolute rung would fail it
    assert result.passed and result.rule.startswith("relative")
    assert result.mae_ceiling == RELATIVE_TOLERANCE["fp32"] * result.reference_spread


def test_constant_outputs_fall_back_to_the_absolute_seed_rung() -> None:
    labels = np.tile([0, 1], 10)
    golden = np.full((20, 1), 0.25)
    result = verify("fp16", golden + 5e-4, golden, labels, TINY_MANIFEST)
    assert result.rule.startswith("absolute") and "constant" in result.rule
    assert result.passed and result.mae_tolerance == MAE_TOLERANCE["fp16"]
    assert not verify("fp16", golden + 2e-3, golden, labels, TINY_MANIFEST).passed


def test_an_explicit_tolerance_is_absolute_and_says_so() -> None:
    labels, golden = _labels_and_golden(1.0)
    result = verify("int8", golden + 0.02, golden, labels, TINY_MANIFEST, mae_tolerance=0.01)
    assert result.rule == "absolute: MAE < 0.01 (--mae-tolerance int8=0.01)"
    assert result.reasons == ("MAE 0.02 >= tolerance 0.01",) and result.relative_mae is None


def test_report_names_the_rule_for_each_variant(optimized: object) -> None:
    import json
    from pathlib import Path

    folder = Path(str(optimized))
    report = json.loads((folder / "report.json").read_text())
    rules = {v["name"]: v["tolerance_rule"] for v in report["variants"]}
    assert rules["onnx-fp32"].startswith("relative: MAE / std of the reference outputs")
    assert any(r.startswith("absolute: MAE < 0.05 (--mae-tolerance int8") for n, r in
               rules.items() if n.startswith("onnx-int8"))
    assert report["validation"]["output_spread"] > 0
    md = (folder / "report.md").read_text()
    assert f"Tolerance for onnx-fp32: {rules['onnx-fp32']}." in md
