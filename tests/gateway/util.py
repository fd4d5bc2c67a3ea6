"""Builders of DICOM instances for gateway tests."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset

from optimizer.synthetic import SynthConfig, radiograph, to_dataset


def make_instance(seed: int = 0, size: int = 128) -> Dataset:
    rng = np.random.default_rng(seed)
    return to_dataset(radiograph(rng, lesion=bool(seed % 2), cfg=SynthConfig(size=size)), rng,
                      index=seed)


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
