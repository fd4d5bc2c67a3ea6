"""Labelled DICOM folders (labels.csv beside the files), loaded through the model preprocessing."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from optimizer.errors import DatasetError, PreprocessError
from optimizer.manifest import InputSpec
from optimizer.preprocess import preprocess
from optimizer.synthetic import LABELS_FILE


@dataclass(frozen=True)
class LabelledSet:
    """Preprocessed inputs (N, C, H, W) float32 and their binary labels (N,)."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_labelled(folder: Path, spec: InputSpec, limit: int | None = None) -> LabelledSet:
    """Read ``folder/labels.csv`` (columns file,label) and preprocess each listed instance."""
    table = folder / LABELS_FILE
    if not table.is_file():
        raise DatasetError(f"{folder}: no {LABELS_FILE} (columns: file,label)")
    with table.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DatasetError(f"{table}: no rows")
    inputs = np.empty((len(rows), *spec.shape), dtype=np.float32)
    labels = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        try:
            path = folder / row["file"]
            labels[i] = int(row["label"])
            inputs[i] = preprocess(pydicom.dcmread(path), spec)
        except (KeyError, ValueError) as exc:
            raise DatasetError(f"{table}, row {i + 2}: {exc}") from exc
        except (OSError, PreprocessError, pydicom.errors.InvalidDicomError) as exc:
            raise DatasetError(f"{folder / row.get('file', '?')}: {exc}") from exc
    found = set(np.unique(labels).tolist())
    if found - {0, 1}:
        raise DatasetError(f"{table}: labels must be 0 or 1")
    if found != {0, 1}:
        raise DatasetError(f"{table}: needs both positive (1) and negative (0) examples")
    return LabelledSet(inputs=inputs, labels=labels)
