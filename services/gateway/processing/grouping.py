"""Groups of instances (one instance, a series or a study) and what the worker hands on when a
group closes.

A group collects acknowledged instances of one series (or one study) until no new instance of it
has arrived for the inactivity timeout; then the series are selected by the manifest's rules and
inferred (per instance or per series), and the completed group goes to the ``GroupSink`` (the
delivery outbox). Only after ``GroupSink.accept`` returned is the group closed and are its spool
files released; an ``accept`` that raises is retried later, never dropped.

The key of a group is stable across restarts and carries no UID: a hash of the level, the
hashed study/series UIDs and the name of the job that opened the group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
from pydicom.dataset import Dataset

from optimizer.manifest import GroupLevel, InferUnit, Manifest, Orientation, Selection
from optimizer.preprocess import resize
from services.errors import ConfigError

LEVELS: tuple[GroupLevel, ...] = ("instance", "series", "study")


@dataclass(frozen=True)
class CompletedGroup:
    """A closed group, as the delivery side sees it. Raw UIDs live in memory only (never logs)."""

    key: str  # stable idempotency key (see ``group_key``); no raw UID
    level: str  # "instance" | "series" | "study"
    study_uid: str
    series_uids: tuple[str, ...]
    job_names: tuple[str, ...]  # job-table names of every instance in the group
    # Part-10 files of the inferred source instances (series order), valid until accept returned.
    sources: tuple[Path, ...]
    results: tuple[dict[str, Any], ...]  # result documents of the inferred items, errors included
    # Segmentation only: .npy activated class maps per inferred item (same order as results).
    maps: tuple[Path, ...]
    protocols: tuple[str, ...]  # e.g. ("dimse",), ("stow",), ("rest",)
    calling_aets: tuple[str, ...]  # DIMSE calling AE titles seen; empty for HTTP


class GroupSink(Protocol):
    def accept(self, group: CompletedGroup) -> None:
        """Durably record the group (outbox) before returning; raising means "try again later"."""
        ...


def group_key(level: str, study_hash: str, series_hash: str, opened_by: str) -> str:
    """The group's idempotency key: the same group gets the same key after a restart."""
    text = "|".join((level, study_hash, series_hash, opened_by))
    return hashlib.sha256(text.encode("ascii", "replace")).hexdigest()[:24]


@dataclass(frozen=True)
class GroupingPolicy:
    """What the worker does with arrivals, resolved once at start from the manifest and the
    gateway config: the manifest says what the model needs (level, timeout, per-instance or
    per-series inference, selection); the config may override the level and the timeout."""

    level: GroupLevel = "instance"
    timeout_s: float = 30.0
    infer: InferUnit = "instance"
    selection: Selection = field(default_factory=Selection)

    @classmethod
    def resolve(cls, manifest: Manifest, level: str | None = None,
                timeout_s: float | None = None) -> GroupingPolicy:
        """``level``/``timeout_s`` None: the manifest's. ConfigError when the override leaves
        the manifest's needs unmet (per-series inference or min_instances > 1 with no groups)."""
        chosen = level if level is not None else manifest.grouping.level
        if chosen not in LEVELS:
            raise ConfigError(f"group level {chosen!r} is not one of {', '.join(LEVELS)}")
        timeout = timeout_s if timeout_s is not None else manifest.grouping.timeout_s
        if timeout <= 0:
            raise ConfigError("group timeout must be > 0 seconds")
        if chosen == "instance" and manifest.infer == "series":
            raise ConfigError(f"model {manifest.name} infers per series: group level must be "
                              "series or study")
        if chosen == "instance" and manifest.selection.min_instances > 1:
            raise ConfigError(f"model {manifest.name} selects series of at least "
                              f"{manifest.selection.min_instances} instances: group level must "
                              "be series or study")
        return cls(level=chosen, timeout_s=timeout,
                   infer=manifest.infer, selection=manifest.selection)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` numbers from a multi-valued DS element, or None when absent or malformed."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _plane_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of ``keyword`` in the shared (else first per-frame) functional groups of
    an enhanced multi-frame instance."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if seq:
            inner = seq[0].get(keyword)
            if inner:
                return cast(Dataset, inner[0])
    return None


def _orientation_vector(ds: Dataset) -> tuple[float, ...] | None:
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if iop is None:
        item = _plane_item(ds, "PlaneOrientationSequence")
        iop = _floats(item.get("ImageOrientationPatient"), 6) if item is not None else None
    return iop


def _normal(ds: Dataset) -> np.ndarray | None:
    iop = _orientation_vector(ds)
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


def _position(ds: Dataset) -> tuple[float, ...] | None:
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    if ipp is None:
        item = _plane_item(ds, "PlanePositionSequence")
        ipp = _floats(item.get("ImagePositionPatient"), 3) if item is not None else None
    return ipp


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
    positions = [_position(ds) for ds in headers]
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


def series_volume(slices: Sequence[np.ndarray], depth: int) -> np.ndarray:
    """Preprocessed slices (each (1, C, H, W), in slice order) -> the 3-D model input
    (1, C, depth, H, W), resampled along the slices as ``optimizer.preprocess`` does for the
    frames of one multi-frame instance."""
    stack = np.concatenate(slices)  # (n, C, H, W)
    n, c, h, w = stack.shape
    volume = resize(stack.reshape(n, -1), depth, c * h * w).reshape(depth, c, h, w)
    return np.ascontiguousarray(volume.transpose(1, 0, 2, 3))[None].astype(np.float32)
