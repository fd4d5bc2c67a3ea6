"""Reference models for tests and benchmarks, ready for ``bedside optimize``.

- ``densenet121``: MONAI DenseNet121, 2-D, 1x224x224, classification (the chest X-ray shape);
- ``unet2d``: MONAI BasicUNet, 2-D, 1x256x256, segmentation;
- ``unet3d``: MONAI BasicUNet, 3-D patches of 1x64x64x64, segmentation.
Weights are random (seeded): fine for speed figures and for verifying variants against their own
FP32 outputs; accuracy figures come from the demo's trained model. Data is synthesized: DICOM
radiographs for the 2-D models, ``.npy`` patches for the 3-D one (the optimizer does not
assemble series into volumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimizer import checkpoint
from optimizer.contract.manifest import AccuracyBudget, InputSpec, Manifest, Normalize, OutputSpec
from optimizer.synthetic import (
    SynthConfig,
    write_labelled_set,
    write_labels,
    write_segmentation_set,
)


@dataclass(frozen=True)
class Reference:
    architecture: str
    kwargs: dict[str, Any]
    manifest: Manifest


def _manifest(name: str, task: str, side: int, depth: int | None = None) -> Manifest:
    return Manifest(
        name=name, version=1, task=task,  # type: ignore[arg-type]
        input=InputSpec(name="image", modalities=("CR", "DX"), height=side, width=side,
                        channels=1, window=None, normalize=Normalize(mean=0.4, std=0.2),
                        depth=depth),
        output=OutputSpec(name="logits" if task == "classification" else "mask",
                          labels=("lesion",), activation="sigmoid", thresholds=(0.5,)),
        accuracy_budget=AccuracyBudget(max_auc_drop=0.005, min_agreement=0.99,
                                       max_dice_drop=0.01),
        latency_slo_ms=200.0,
    )


def reference(name: str, side: int | None = None) -> Reference:
    """A reference model by name; ``side`` shrinks it (tests use small inputs)."""
    if name == "densenet121":
        return Reference("DenseNet121", {"spatial_dims": 2, "in_channels": 1, "out_channels": 1},
                         _manifest(name, "classification", side or 224))
    if name == "unet2d":
        return Reference("BasicUNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                                       "features": (16, 32, 64, 128, 256, 16)},
                         _manifest(name, "segmentation", side or 256))
    if name == "unet3d":
        s = side or 64
        return Reference("BasicUNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                                       "features": (8, 16, 32, 64, 128, 8)},
                         _manifest(name, "segmentation", s, depth=s))
    raise ValueError(f"unknown reference model {name!r}: densenet121, unet2d, unet3d")


def _write_volumes(out_dir: Path, count: int, side: int, seed: int) -> None:
    """Noisy volumes with a faint sphere in two of three, and the sphere masks."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    z, y, x = np.mgrid[0:side, 0:side, 0:side]
    rows = []
    for i in range(count):
        vol = rng.normal(0.0, 1.0, (side, side, side)).astype(np.float32)
        mask = np.zeros((side, side, side), np.uint8)
        if i % 3:
            c = rng.uniform(side * 0.25, side * 0.75, 3)
            r = rng.uniform(side * 0.06, side * 0.15)
            mask = (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) <= r * r).astype(
                np.uint8)
            vol += 1.5 * mask
        np.save(out_dir / f"vol{i:04d}.npy", vol[None])
        np.save(out_dir / f"vol{i:04d}.mask.npy", mask[None])
        rows.append((f"vol{i:04d}.npy", f"vol{i:04d}.mask.npy"))
    write_labels(out_dir, ("file", "mask"), rows)


def write_reference(name: str, out: Path, side: int | None = None, calibration: int = 32,
                    validation: int = 64, seed: int = 0) -> Reference:
    """Write ``model.pt``, ``manifest.json``, ``calibration/`` and ``validation/`` to ``out``."""
    ref = reference(name, side)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = checkpoint.build(ref.architecture, ref.kwargs).eval()
    checkpoint.save(out / "model.pt", ref.architecture, ref.kwargs, model)
    ref.manifest.save(out / "manifest.json")
    spec = ref.manifest.input
    cfg = SynthConfig(size=max(256, spec.height))
    if name == "unet3d":
        _write_volumes(out / "calibration", calibration, spec.height, seed + 1)
        _write_volumes(out / "validation", validation, spec.height, seed + 2)
    elif ref.manifest.task == "segmentation":
        write_segmentation_set(out / "calibration", calibration, seed + 1, cfg)
        write_segmentation_set(out / "validation", validation, seed + 2, cfg)
    else:
        write_labelled_set(out / "calibration", calibration, seed + 1, cfg)
        write_labelled_set(out / "validation", validation, seed + 2, cfg)
    return ref
