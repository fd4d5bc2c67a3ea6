"""Segmentation through the optimizer: reference UNets (2-D from DICOM, 3-D from .npy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from optimizer.contract.manifest import Manifest
from optimizer.dataset import load_labelled
from optimizer.pipeline import OptimizeRequest, optimize
from optimizer.reference import write_reference
from optimizer.verify import dice, verify
from tests.optimizer.quick_bench import QUICK_BENCH


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[:1] = True
    assert dice(a, b) == pytest.approx(2 * 4 / (8 + 4))
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_segmentation_masks_load_resized(tmp_path: Path) -> None:
    write_reference("unet2d", tmp_path, side=32, calibration=3, validation=6)
    manifest = Manifest.load(tmp_path / "manifest.json")
    data = load_labelled(tmp_path / "validation", manifest)
    assert data.inputs.shape == (6, 1, 32, 32)
    assert data.labels.shape == (6, 1, 32, 32) and data.labels.dtype == np.uint8
    assert data.labels[1].sum() > 0 and data.labels[0].sum() == 0  # rows cycle 0, 1, 2 lesions


def test_segmentation_verification_uses_dice(tmp_path: Path) -> None:
    write_reference("unet2d", tmp_path, side=32, calibration=3, validation=6)
    manifest = Manifest.load(tmp_path / "manifest.json")
    labels = load_labelled(tmp_path / "validation", manifest).labels
    golden = np.where(labels > 0, 5.0, -5.0).astype(np.float32)
    perfect = verify("fp32", golden.copy(), golden, labels, manifest)
    assert perfect.metric == "dice" and perfect.metric_value == 1.0 and perfect.passed
    eroded = golden.copy()
    eroded[labels > 0] = -5.0  # the variant loses every lesion pixel
    lost = verify("int8", eroded, golden, labels, manifest, mae_tolerance=100.0)
    assert not lost.passed and lost.metric_delta == pytest.approx(-1.0)
    assert any("DICE drop" in r for r in lost.reasons)


@pytest.mark.parametrize(("name", "side"), [("unet2d", 32), ("unet3d", 32)])
def test_reference_unets_go_through_optimize(name: str, side: int, tmp_path: Path) -> None:
    write_reference(name, tmp_path / "ref", side=side, calibration=4, validation=6)
    result = optimize(OptimizeRequest(
        checkpoint=tmp_path / "ref" / "model.pt", manifest=tmp_path / "ref" / "manifest.json",
        calibration_dir=tmp_path / "ref" / "calibration",
        validation_dir=tmp_path / "ref" / "validation", out_dir=tmp_path / "out", threads=1,
        calibration_methods=("minmax",), bench=QUICK_BENCH,
    ))
    report = json.loads(result.report_json.read_text())
    assert report["task"] == "segmentation" and report["validation"]["metric"] == "dice"
    assert report["variants"][0]["verdict"] == "pass"
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = text_format.Parse((result.repository / name / "config.pbtxt").read_text(),
                               mc.ModelConfig())
    spatial = [side] * (3 if name == "unet3d" else 2)
    assert list(config.input[0].dims) == [1, *spatial]
    assert list(config.output[0].dims) == [1, *spatial]
