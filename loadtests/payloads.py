"""Realistic synthetic DICOM payloads for load: 512x512 12-bit CR chest radiographs (the
project's synthetic generator, fake patient data), a fresh Study/Series/SOP Instance UID on
every request so that nothing is deduplicated or cached along the way."""

from __future__ import annotations

import copy
import io
import itertools
from collections.abc import Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from optimizer.synthetic import SynthConfig, radiograph, to_dataset

SIDE = 512


class Payloads:
    """A small pool of distinct images, re-stamped with new UIDs on each use."""

    def __init__(self, count: int = 4, side: int = SIDE, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        cfg = SynthConfig(size=side)
        self._pool = [to_dataset(radiograph(rng, lesion=bool(k % 2), cfg=cfg), rng, index=k)
                      for k in range(count)]
        self._next: Iterator[Dataset] = itertools.cycle(self._pool)

    def dataset(self, study_uid: str | None = None) -> Dataset:
        """The next image as a new instance (of ``study_uid`` if given, else a new study)."""
        ds = copy.deepcopy(next(self._next))  # Dataset.copy() shares the elements
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid or generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        return ds

    def part10(self, study_uid: str | None = None) -> bytes:
        """The next image as a DICOM Part-10 file."""
        buf = io.BytesIO()
        self.dataset(study_uid).save_as(buf, enforce_file_format=True)
        return buf.getvalue()
