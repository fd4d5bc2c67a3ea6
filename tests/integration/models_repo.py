"""A model repository with two models for the multi-model integration tests: the optimizer's
tiny CR classifier and a small CT segmentation model (a MONAI UNet, randomly initialised,
exported to ONNX and written by the optimizer's repository writer)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from optimizer.contract.manifest import Grouping, Manifest
from tests.gateway.models import CT_SEG


def add_segmentation_model(repo: Path, work: Path, manifest: Manifest = CT_SEG,
                           seed: int = 0) -> int:
    """Export a small 2-D UNet for ``manifest`` and add it to ``repo`` as a new version (the
    manifest's version for a new model); the version written."""
    import torch
    from monai.networks.nets import UNet

    from optimizer.export import export_onnx
    from optimizer.repository import ServingOptions, write_repository

    torch.manual_seed(seed)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=len(manifest.output.labels),
               channels=(4, 8), strides=(2,), num_res_units=0).eval()
    onnx = export_onnx(net, manifest, work / f"seg-{seed}.onnx")
    _, version = write_repository(repo, manifest, onnx, "fp32",
                                  ServingOptions(max_batch_size=4, preferred_batch_sizes=(4,),
                                                 warmup_runs=1))
    return version


def two_model_repository(optimized: Path, work: Path) -> Path:
    """The tiny classifier's repository plus the CT segmentation model, under ``work``; its
    series groups wait 2 s for another slice (a kill can land while one is open)."""
    repo = work / "repository"
    shutil.copytree(optimized / "repository", repo)
    add_segmentation_model(repo, work, dataclasses.replace(
        CT_SEG, grouping=Grouping("series", 2.0)))
    return repo
