"""Builders of DICOM instances for gateway tests."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from optimizer.synthetic import SynthConfig, radiograph, to_dataset


def make_instance(seed: int = 0, size: int = 128) -> Dataset:
    rng = np.random.default_rng(seed)
    return to_dataset(radiograph(rng, lesion=bool(seed % 2), cfg=SynthConfig(size=size)), rng,
                      index=seed)


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def bad_window_center() -> RawDataElement:
    """WindowCenter "abc": a malformed DS value, kept raw as a careless sender would write it."""
    return RawDataElement(Tag(0x00281050), "DS", 4, b"abc ", 0, False, True)


def make_study(n: int, seed: int = 0) -> list[Dataset]:
    """``n`` instances of one new study and series (seeds ``seed`` .. ``seed + n - 1``)."""
    study, series = generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = make_instance(seed + k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        out.append(ds)
    return out
