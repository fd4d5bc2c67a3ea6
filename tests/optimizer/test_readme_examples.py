"""Issue 15 (9): the README's worked manifests are valid and mean what the text says."""

from __future__ import annotations

import json
import re

from optimizer.contract.manifest import Manifest
from tests.conftest import ROOT


def _examples() -> list[Manifest]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("#### Worked examples"):text.index("#### Pixel formats")]
    return [Manifest.from_dict(json.loads(block))
            for block in re.findall(r"```json\n(.*?)```", section, re.DOTALL)]


def test_worked_examples_are_valid_manifests() -> None:
    binary, multi, seg2d, seg3d = _examples()
    assert binary.task == "classification" and binary.output.labels == ("lesion",)
    assert multi.output.activation == "softmax" and len(multi.output.labels) == 3
    assert multi.output.prediction == 0
    assert seg2d.task == "segmentation" and seg2d.input.shape == (1, 256, 256)
    assert seg2d.input.window is not None
    window = seg2d.input.window
    assert (window.center - window.width / 2, window.center + window.width / 2) == (-1350, 150)
    assert seg3d.input.shape == (1, 64, 64, 64)  # (channels, depth, height, width)
