"""Labelled folders (a labels.csv beside the files), loaded through the model's preprocessing.

labels.csv columns:
- classification: ``file,label`` with label 0 or 1;
- segmentation: ``file,mask`` with mask a ``.npy`` of shape (K, H, W) or (H, W) for one class,
  at the image's resolution (resized to the model's like the image) or at the model's.
``file`` is a DICOM instance (preprocessed per the manifest) or a ``.npy`` already shaped as the
model input (3-D patches, which need series assembly the optimizer does not do).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from optimizer.contract.errors import PreprocessError
from optimizer.contract.manifest import Manifest
from optimizer.contract.preprocess import preprocess, resize
from optimizer.errors import DatasetError
from optimizer.synthetic import LABELS_FILE


@dataclass(frozen=True)
class LabelledSet:
    """Inputs (N, *input shape) float32, and labels: (N,) for classification, (N, K, ...)
    binary masks for segmentation."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _load_input(path: Path, manifest: Manifest) -> np.ndarray:
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False).astype(np.float32)
        if arr.shape != manifest.input.shape:
            batch = " (drop the batch axis: one input per file)" \
                if arr.shape[1:] == manifest.input.shape and arr.shape[0] == 1 else ""
            raise DatasetError(f"{path}: shape {arr.shape}, model takes {manifest.input.shape}"
                               f"{batch}; .npy inputs are used as they are, already windowed "
                               "and normalized")
        return arr
    return preprocess(pydicom.dcmread(path), manifest.input)


def _load_mask(path: Path, manifest: Manifest) -> np.ndarray:
    mask = np.load(path, allow_pickle=False)
    classes = len(manifest.output.labels)
    if mask.ndim == len(manifest.input.shape) - 1 and classes == 1:
        mask = mask[None]
    spatial = manifest.input.shape[1:]
    if mask.shape[0] != classes:
        raise DatasetError(f"{path}: {mask.shape[0]} mask channels, manifest has {classes}")
    if mask.shape[1:] != spatial:
        if len(spatial) != 2:
            raise DatasetError(f"{path}: 3-D masks must already have shape {spatial}")
        mask = np.stack([resize(m.astype(np.float32), *spatial) > 0.5 for m in mask])
    return (mask > 0).astype(np.uint8)


def load_labelled(folder: Path, manifest: Manifest, limit: int | None = None) -> LabelledSet:
    table = folder / LABELS_FILE
    column = "label" if manifest.task == "classification" else "mask"
    if not table.is_file():
        raise DatasetError(f"{folder}: no {LABELS_FILE} (columns: file,{column})")
    with table.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DatasetError(f"{table}: no rows")
    inputs = np.empty((len(rows), *manifest.input.shape), dtype=np.float32)
    labels: list[np.ndarray] = []
    for i, row in enumerate(rows):
        try:
            inputs[i] = _load_input(folder / row["file"], manifest)
            if column == "label":
                labels.append(np.asarray(int(row["label"])))
            else:
                labels.append(_load_mask(folder / row["mask"], manifest))
        except (KeyError, ValueError, TypeError) as exc:
            raise DatasetError(f"{table}, row {i + 2}: {exc}") from exc
        except (OSError, PreprocessError, pydicom.errors.InvalidDicomError) as exc:
            raise DatasetError(f"{folder / row.get('file', '?')}: {exc}") from exc
    stacked = np.stack(labels)
    if column == "label":
        classes = len(manifest.output.labels) if manifest.output.activation == "softmax" else 2
        found = set(np.unique(stacked).tolist())
        if found - set(range(classes)):
            raise DatasetError(f"{table}: labels must lie in 0..{classes - 1}")
        if len(found) < 2:
            raise DatasetError(f"{table}: needs examples of at least two classes")
    return LabelledSet(inputs=inputs, labels=stacked)


def load_inputs(folder: Path, manifest: Manifest, limit: int | None = None) -> np.ndarray:
    """Inputs only (calibration needs no labels): the files listed in labels.csv when there is
    one, else every .dcm / .npy file in the folder, in name order."""
    table = folder / LABELS_FILE
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as fh:
            names = [row.get("file") or "" for row in csv.DictReader(fh)]
    else:
        names = sorted(p.name for p in folder.glob("*") if p.suffix in (".dcm", ".npy")
                       and not p.name.endswith(".mask.npy"))
    names = names[:limit] if limit is not None else names
    if not names or not all(names):
        raise DatasetError(f"{folder}: no input files (or a labels.csv row without a file)")
    try:
        return np.stack([_load_input(folder / n, manifest) for n in names])
    except (OSError, PreprocessError, pydicom.errors.InvalidDicomError) as exc:
        raise DatasetError(f"{folder}: {exc}") from exc
