"""Two models in one repository for the multi-model tests: the tiny CR classifier and a small
CT segmentation model (2-D, per instance, grouped per series), and CT instances to feed it."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from optimizer.contract.manifest import Grouping, Manifest, Normalize, Selection, Window
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer

CT_SEG = dataclasses.replace(
    TINY_MANIFEST, name="tiny-ctseg", task="segmentation",
    input=dataclasses.replace(TINY_MANIFEST.input, modalities=("CT",), height=32, width=32,
                              window=Window(40.0, 400.0), normalize=Normalize(0.5, 0.25)),
    output=dataclasses.replace(TINY_MANIFEST.output, name="mask"),
    grouping=Grouping("series", 0.3), selection=Selection(modalities=("CT",)),
)


def two_model_repository(tmp: Path, seg: Manifest = CT_SEG) -> Path:
    """A repository with the classifier's and the segmentation model's manifests."""
    repo = tmp / "repo"
    for manifest in (TINY_MANIFEST, seg):
        (repo / manifest.name).mkdir(parents=True, exist_ok=True)
        manifest.save(repo / manifest.name / "manifest.json")
    return repo


def ct_series(slices: int, study_uid: str | None = None) -> list[Dataset]:
    """A CT series (pydicom's CT_small.dcm, stacked 5 mm apart) in ``study_uid``."""
    ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ct.StudyInstanceUID = study_uid or generate_uid()
    ct.SeriesInstanceUID = generate_uid()
    x, y, z = (float(v) for v in ct.ImagePositionPatient)
    series = []
    for i in range(slices):
        s = copy.deepcopy(ct)
        s.SOPInstanceUID = s.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        s.ImagePositionPatient = [f"{v:.4f}" for v in (x, y, z + 5.0 * i)]
        s.InstanceNumber = i + 1
        series.append(s)
    return series


class SegFake(FakeInferer):
    """The segmentation model's fake Triton: the input itself as the one class's logits."""

    model = CT_SEG.name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return batch[:, :1].copy()
