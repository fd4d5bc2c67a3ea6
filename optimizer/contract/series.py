"""A series as one model input: slice order, the manifest's selection rules, and the volume.

The gateway groups instances per series; at group close it orders each series with
``slice_order``, asks ``not_selected`` whether the model is for it, and, for a model that infers
per series, makes the input here: a 3-D model gets ``series_volume`` of the slices, each
preprocessed by ``slice_input`` exactly as ``optimizer.contract.preprocess`` does a 2-D image,
and stacked by the same ``stack_volume`` that turns the frames of one multi-frame instance into
a volume. Orientation and position come from the instance or, for enhanced multi-frame objects,
from their plane functional groups.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import numpy as np
from pydicom.dataset import Dataset

from optimizer.contract.manifest import InputSpec, Orientation, Selection
from optimizer.contract.preprocess import (
    DEFAULT_LIMITS,
    PixelLimits,
    functional_group,
    preprocess_frames,
    stack_volume,
)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` numbers from a multi-valued DS element, or None when absent or malformed."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _plane_value(ds: Dataset, keyword: str, sequence: str, n: int) -> tuple[float, ...] | None:
    """``keyword`` (n numbers) of the instance, else of its first frame's plane functional
    group ``sequence`` (enhanced multi-frame objects)."""
    values = _floats(ds.get(keyword), n)
    if values is None:
        item = functional_group(ds, sequence)
        values = _floats(item.get(keyword), n) if item is not None else None
    return values


def _normal(ds: Dataset) -> np.ndarray | None:
    iop = _plane_value(ds, "ImageOrientationPatient", "PlaneOrientationSequence", 6)
    if iop is None:
        return None
    normal = np.cross(np.array(iop[:3]), np.array(iop[3:]))
    norm = float(np.linalg.norm(normal))
    return normal / norm if norm > 1e-6 else None


def orientation(ds: Dataset) -> Orientation | None:
    """The plane an image lies in, from ImageOrientationPatient: the patient axis its normal is
    closest to (x: sagittal, y: coronal, z: axial); None without a usable orientation."""
    normal = _normal(ds)
    if normal is None:
        return None
    planes: tuple[Orientation, ...] = ("sagittal", "coronal", "axial")
    return planes[int(np.argmax(np.abs(normal)))]


def _instance_number(ds: Dataset) -> int | None:
    try:
        return int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return None


def slice_order(headers: Sequence[Dataset]) -> list[int]:
    """Indices of ``headers`` (one series) in slice order: by ImagePositionPatient projected on
    the normal of the first instance's plane when every instance has both; else by
    InstanceNumber when every instance has one; else as given (arrival order)."""
    n = len(headers)
    normal = _normal(headers[0]) if n else None
    positions = [_plane_value(ds, "ImagePositionPatient", "PlanePositionSequence", 3)
                 for ds in headers]
    if normal is not None and all(p is not None for p in positions):
        along = [float(np.dot(normal, np.array(p))) for p in positions]
        return sorted(range(n), key=lambda i: (along[i], i))
    numbers = [_instance_number(ds) for ds in headers]
    if all(k is not None for k in numbers):
        return sorted(range(n), key=lambda i: (cast(int, numbers[i]), i))
    return list(range(n))


def not_selected(selection: Selection, headers: Sequence[Dataset]) -> str | None:
    """Why a series (``headers`` in slice order, at least one) is not for the model, as a
    bounded reason (``not_selected_<rule>``); None when every rule accepts it. Per-instance
    facts are read from the series' first instance."""
    first = headers[0]
    if selection.modalities and str(first.get("Modality", "")).strip() \
            not in selection.modalities:
        return "not_selected_modality"
    if selection.body_parts and str(first.get("BodyPartExamined", "")).strip().upper() \
            not in selection.body_parts:
        return "not_selected_body_part"
    if selection.orientations and orientation(first) not in selection.orientations:
        return "not_selected_orientation"
    if selection.max_slice_thickness is not None:
        thickness = _floats([first.get("SliceThickness")], 1)
        if thickness is None or thickness[0] > selection.max_slice_thickness:
            return "not_selected_slice_thickness"
    if len(headers) < selection.min_instances:
        return "not_selected_min_instances"
    return None


def not_admitted(selection: Selection, ds: Dataset, calling_aet: str | None = None) -> str | None:
    """Why one arriving instance is not for the model by its routing rules (SOP class, series
    description pattern, manufacturer, calling AE title), as a bounded reason
    (``not_selected_<rule>``); None when every routing rule accepts it. ``calling_aet`` None
    (an HTTP edge) fails a rule that names calling AE titles."""
    if selection.sop_classes and str(ds.get("SOPClassUID", "")) not in selection.sop_classes:
        return "not_selected_sop_class"
    if selection.series_description is not None and re.search(
            selection.series_description, str(ds.get("SeriesDescription", ""))) is None:
        return "not_selected_series_description"
    if selection.manufacturers and str(ds.get("Manufacturer", "")).strip().casefold() \
            not in {m.casefold() for m in selection.manufacturers}:
        return "not_selected_manufacturer"
    if selection.calling_aets and (calling_aet or "").strip() not in selection.calling_aets:
        return "not_selected_calling_aet"
    return None


def slice_spec(spec: InputSpec) -> InputSpec:
    """What one slice of a series must be for a 3-D model: a 2-D image (its middle frame)."""
    return replace(spec, depth=None, frames="middle")


def slice_input(ds: Dataset, spec: InputSpec, header_checked: bool = False,
                limits: PixelLimits = DEFAULT_LIMITS) -> np.ndarray:
    """One slice of a series for the 3-D model ``spec``: preprocessed as a 2-D image,
    (1, C, H, W); a PreprocessError says why it cannot be."""
    return preprocess_frames(ds, slice_spec(spec), header_checked, limits)


def series_volume(slices: Sequence[np.ndarray], depth: int) -> np.ndarray:
    """Slices from ``slice_input`` (each (1, C, H, W), in slice order) -> the 3-D model input
    (1, C, depth, H, W), resampled along the slices as the frames of one instance are."""
    return stack_volume(np.concatenate(slices), depth)
