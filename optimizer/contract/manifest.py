"""The model manifest: the contract that travels with a model.

The optimizer reads it and writes it beside ``config.pbtxt``; the gateway reads preprocessing and
labels from it, so a new model never needs gateway code. It is validated once, on load, into
frozen dataclasses; code downstream never re-checks it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from optimizer.contract.errors import ManifestError

SCHEMA_VERSION = 1
Task = Literal["classification", "segmentation"]
Activation = Literal["sigmoid", "softmax", "none"]
# Which of the instance's own VOI transforms to use when the manifest fixes no window:
# "window" = Window Center/Width first, then a VOI LUT Sequence; "lut" = the other way round;
# "minmax" = neither, the modality values are scaled from their minimum to their maximum.
VoiSource = Literal["window", "lut", "minmax"]
# 2-D models and multi-frame instances: "middle" infers the middle frame (index frames // 2);
# "all" infers every frame (the gateway reports the highest score over the frames).
FrameChoice = Literal["middle", "all"]
# The gateway groups instances before inferring: "instance" = each on its own (no grouping),
# "series"/"study" = until no instance of that series/study arrived for ``timeout_s``.
GroupLevel = Literal["instance", "series", "study"]
# "instance" = one inference per instance; "series" = one per selected series at group close
# (a 3-D model gets the sorted slices as its volume, a 2-D model the middle slice).
InferUnit = Literal["instance", "series"]
Orientation = Literal["axial", "coronal", "sagittal"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAX_SIDE = 4096
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_AE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")


@dataclass(frozen=True)
class Window:
    """A fixed VOI window (centre/width in modality units) applied before normalisation."""

    center: float
    width: float


@dataclass(frozen=True)
class Normalize:
    """Affine normalisation applied to the windowed [0, 1] image: (x - mean) / std."""

    mean: float
    std: float


@dataclass(frozen=True)
class InputSpec:
    """What the model takes and how a DICOM instance becomes that tensor."""

    name: str
    modalities: tuple[str, ...]
    height: int
    width: int
    channels: int
    # None: use the instance's own VOI (WindowCenter/WindowWidth), else its min/max.
    window: Window | None
    normalize: Normalize
    # 3-D models (patches of a volume): depth in slices; None for 2-D images.
    depth: int | None = None
    voi: VoiSource = "window"
    frames: FrameChoice = "middle"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.depth is not None:
            return (self.channels, self.depth, self.height, self.width)
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class OutputSpec:
    """The model's output tensor: one score per label, turned into findings by thresholds."""

    name: str
    labels: tuple[str, ...]
    activation: Activation
    thresholds: tuple[float, ...]
    # For a model that returns a tuple, list or dict: which of its outputs is the prediction
    # (an index, or a key). Only that one is exported and served. None: the model returns one
    # tensor.
    prediction: int | str | None = None


@dataclass(frozen=True)
class AccuracyBudget:
    """How much task accuracy an optimized variant may lose against PyTorch FP32."""

    max_auc_drop: float
    min_agreement: float
    max_dice_drop: float = 0.01


@dataclass(frozen=True)
class Grouping:
    """How the gateway groups instances for this model (the gateway's config may override)."""

    level: GroupLevel = "instance"
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Selection:
    """Which series the model is for; a series failing a rule is skipped, not inferred. Empty
    lists and None accept anything."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()  # BodyPartExamined, compared in upper case
    orientations: tuple[Orientation, ...] = ()  # from ImageOrientationPatient
    min_instances: int = 1
    max_slice_thickness: float | None = None  # mm
    # Routing rules, checked per instance when it arrives (a gateway serving several models
    # hands an instance to every model whose rules accept it; one no model accepts is refused):
    sop_classes: tuple[str, ...] = ()  # SOPClassUID
    # A regular expression searched (re.search) in SeriesDescription; None: any description.
    series_description: str | None = None
    manufacturers: tuple[str, ...] = ()  # Manufacturer, compared case-insensitively
    calling_aets: tuple[str, ...] = ()  # the DIMSE calling AE title (HTTP edges have none)

    def to_dict(self) -> dict[str, Any]:
        return {"modalities": list(self.modalities), "body_parts": list(self.body_parts),
                "orientations": list(self.orientations), "min_instances": self.min_instances,
                "max_slice_thickness": self.max_slice_thickness,
                "sop_classes": list(self.sop_classes),
                "series_description": self.series_description,
                "manufacturers": list(self.manufacturers),
                "calling_aets": list(self.calling_aets)}


@dataclass(frozen=True)
class Manifest:
    """A validated model manifest."""

    name: str
    version: int
    task: Task
    input: InputSpec
    output: OutputSpec
    accuracy_budget: AccuracyBudget
    latency_slo_ms: float
    grouping: Grouping = Grouping()
    infer: InferUnit = "instance"
    selection: Selection = Selection()
    # Who made the model, as AI results name it (their Processing Algorithm equipment item);
    # empty: the gateway's configured result manufacturer stands in.
    manufacturer: str = ""

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-item output: one score per label, or one map per class for segmentation."""
        classes = len(self.output.labels)
        if self.task == "classification":
            return (classes,)
        return (classes, *self.input.shape[1:])

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``from_dict(to_dict(m)) == m``."""
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "input": {
                "name": self.input.name,
                "modalities": list(self.input.modalities),
                "height": self.input.height,
                "width": self.input.width,
                "channels": self.input.channels,
                "window": None
                if self.input.window is None
                else {"center": self.input.window.center, "width": self.input.window.width},
                "normalize": {"mean": self.input.normalize.mean, "std": self.input.normalize.std},
                "depth": self.input.depth,
                "voi": self.input.voi,
                "frames": self.input.frames,
            },
            "output": {
                "name": self.output.name,
                "labels": list(self.output.labels),
                "activation": self.output.activation,
                "thresholds": list(self.output.thresholds),
                **({} if self.output.prediction is None
                   else {"prediction": self.output.prediction}),
            },
            "accuracy_budget": {
                "max_auc_drop": self.accuracy_budget.max_auc_drop,
                "min_agreement": self.accuracy_budget.min_agreement,
                "max_dice_drop": self.accuracy_budget.max_dice_drop,
            },
            "latency_slo_ms": self.latency_slo_ms,
            "grouping": {"level": self.grouping.level, "timeout_s": self.grouping.timeout_s},
            "infer": self.infer,
            "selection": self.selection.to_dict(),
            **({"manufacturer": self.manufacturer} if self.manufacturer else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Validate a decoded manifest; every problem names the field it is about."""
        r = _Reader(data, "manifest")
        schema = r.get("schema_version", int)
        if schema != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest.schema_version: {schema} is not supported (expected {SCHEMA_VERSION})"
            )
        name = r.get("name", str)
        if not _NAME_RE.match(name):
            raise ManifestError(
                "manifest.name: must be 1-64 characters of letters, digits, '_', '.', '-'"
            )
        task = r.get("task", str)
        if task not in ("classification", "segmentation"):
            raise ManifestError(
                f"manifest.task: {task!r} is not supported (classification, segmentation)")

        ri = r.child("input")
        window = None
        if ri.get_optional("window", dict) is not None:
            rw = ri.child("window")
            window = Window(center=rw.number("center"), width=rw.number("width", positive=True))
        rn = ri.child("normalize")
        modalities = tuple(ri.get("modalities", list))
        if not modalities or not all(isinstance(m, str) and m for m in modalities):
            raise ManifestError("manifest.input.modalities: a non-empty list of modality codes")
        spec = InputSpec(
            name=ri.get("name", str),
            modalities=modalities,
            height=ri.side("height"),
            width=ri.side("width"),
            channels=ri.get("channels", int),
            window=window,
            normalize=Normalize(mean=rn.number("mean"), std=rn.number("std", positive=True)),
            depth=ri.side("depth") if ri.get_optional("depth", int) is not None else None,
            voi=ri.choice("voi", ("window", "lut", "minmax"), "window"),
            frames=ri.choice("frames", ("middle", "all"), "middle"),
        )
        if spec.channels not in (1, 3):
            raise ManifestError("manifest.input.channels: must be 1 or 3")

        ro = r.child("output")
        labels = tuple(ro.get("labels", list))
        raw_thresholds = ro.get("thresholds", list)
        if not all(isinstance(t, int | float) and not isinstance(t, bool)
                   for t in raw_thresholds):
            raise ManifestError("manifest.output.thresholds: numbers only")
        thresholds = tuple(float(t) for t in raw_thresholds)
        if not labels or not all(isinstance(label, str) and label for label in labels):
            raise ManifestError("manifest.output.labels: a non-empty list of label names")
        if len(thresholds) != len(labels):
            raise ManifestError("manifest.output.thresholds: one threshold per label")
        activation = ro.get("activation", str)
        if activation not in ("sigmoid", "softmax", "none"):
            raise ManifestError(
                f"manifest.output.activation: {activation!r} is not sigmoid, softmax or none"
            )
        prediction = ro.get_optional("prediction", object)
        if prediction is not None and (
                isinstance(prediction, bool) or not isinstance(prediction, int | str)
                or (isinstance(prediction, int) and prediction < 0) or prediction == ""):
            raise ManifestError("manifest.output.prediction: the index (>= 0) or key of the "
                                "model output that is the prediction")
        output = OutputSpec(
            name=ro.get("name", str),
            labels=labels,
            activation=activation,
            thresholds=thresholds,
            prediction=prediction,
        )

        rb = r.child("accuracy_budget")
        budget = AccuracyBudget(
            max_auc_drop=rb.number("max_auc_drop"), min_agreement=rb.number("min_agreement"),
            max_dice_drop=rb.number("max_dice_drop") if "max_dice_drop" in rb else 0.01,
        )
        if not all(0.0 <= v <= 1.0 for v in (budget.max_auc_drop, budget.min_agreement,
                                                budget.max_dice_drop)):
            raise ManifestError("manifest.accuracy_budget: values must lie in [0, 1]")
        version = r.get("version", int)
        if version < 1:
            raise ManifestError("manifest.version: must be >= 1 (Triton version folders)")
        grouping = Grouping()
        if r.get_optional("grouping", dict) is not None:
            rg = r.child("grouping")
            grouping = Grouping(
                level=rg.choice("level", ("instance", "series", "study"), "instance"),
                timeout_s=rg.number("timeout_s", positive=True) if "timeout_s" in rg else 30.0,
            )
        infer = r.choice("infer", ("instance", "series"), "instance")
        if infer == "series" and grouping.level == "instance":
            raise ManifestError("manifest.infer: 'series' needs grouping.level series or study")
        selection = _selection(r) if r.get_optional("selection", dict) is not None \
            else Selection()
        if selection.min_instances > 1 and grouping.level == "instance":
            raise ManifestError("manifest.selection.min_instances: > 1 needs grouping.level "
                                "series or study")
        manufacturer = r.get_optional("manufacturer", str) or ""
        if manufacturer and (len(manufacturer) > 64 or manufacturer != manufacturer.strip()
                             or not manufacturer.isprintable() or "\\" in manufacturer):
            raise ManifestError("manifest.manufacturer: at most 64 printable characters, no "
                                "backslash, no leading or trailing spaces (DICOM LO)")
        return cls(
            name=name,
            version=version,
            task=task,
            input=spec,
            output=output,
            accuracy_budget=budget,
            latency_slo_ms=r.number("latency_slo_ms", positive=True),
            grouping=grouping,
            infer=infer,
            selection=selection,
            manufacturer=manufacturer,
        )

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ManifestError(f"manifest not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"manifest {path} must hold a JSON object")
        return cls.from_dict(data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _selection(r: _Reader) -> Selection:
    rs = r.child("selection")

    def codes(key: str) -> tuple[str, ...]:
        values = rs.get_optional(key, list) or []
        if not all(isinstance(v, str) and v.strip() for v in values):
            raise ManifestError(f"manifest.selection.{key}: a list of non-empty strings")
        return tuple(v.strip().upper() if key == "body_parts" else v.strip() for v in values)

    orientations = codes("orientations")
    for o in orientations:
        if o not in ("axial", "coronal", "sagittal"):
            raise ManifestError(f"manifest.selection.orientations: {o!r} is not axial, coronal "
                                "or sagittal")
    min_instances = rs.get_optional("min_instances", int)
    if min_instances is not None and min_instances < 1:
        raise ManifestError("manifest.selection.min_instances: must be >= 1")
    thickness = (rs.number("max_slice_thickness", positive=True)
                 if rs.get_optional("max_slice_thickness", object) is not None else None)
    sop_classes = codes("sop_classes")
    for uid in sop_classes:
        if not _UID_RE.match(uid):
            raise ManifestError(f"manifest.selection.sop_classes: {uid!r} is not a UID")
    pattern = rs.get_optional("series_description", str)
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ManifestError("manifest.selection.series_description: not a valid regular "
                                f"expression ({exc})") from exc
    calling_aets = codes("calling_aets")
    for aet in calling_aets:
        if not _AE_RE.match(aet):
            raise ManifestError(f"manifest.selection.calling_aets: {aet!r} is not an AE title "
                                "(1-16 printable characters, no '\\')")
    return Selection(modalities=codes("modalities"), body_parts=codes("body_parts"),
                     orientations=orientations,  # type: ignore[arg-type]  # checked above
                     min_instances=min_instances if min_instances is not None else 1,
                     max_slice_thickness=thickness, sop_classes=sop_classes,
                     series_description=pattern, manufacturers=codes("manufacturers"),
                     calling_aets=calling_aets)


class _Reader:
    """Typed access to one JSON object, with errors that name the field's full path."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self._data = data
        self._where = where

    def get(self, key: str, kind: type) -> Any:
        if key not in self._data:
            raise ManifestError(f"{self._where}.{key}: missing")
        value = self._data[key]
        if kind is int and isinstance(value, bool):
            raise ManifestError(f"{self._where}.{key}: expected int")
        if not isinstance(value, kind):
            raise ManifestError(f"{self._where}.{key}: expected {kind.__name__}")
        return value

    def get_optional(self, key: str, kind: type) -> Any:
        if self._data.get(key) is None:
            return None
        return self.get(key, kind)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> Any:
        """An optional string field limited to ``allowed`` (absent in older manifests)."""
        value = self.get_optional(key, str)
        if value is None:
            return default
        if value not in allowed:
            raise ManifestError(f"{self._where}.{key}: {value!r} is not one of "
                                f"{', '.join(allowed)}")
        return value

    def number(self, key: str, positive: bool = False) -> float:
        value = self._data.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ManifestError(f"{self._where}.{key}: expected a number")
        if positive and value <= 0:
            raise ManifestError(f"{self._where}.{key}: must be > 0")
        return float(value)

    def side(self, key: str) -> int:
        value = self.get(key, int)
        if not 8 <= value <= _MAX_SIDE:
            raise ManifestError(f"{self._where}.{key}: must lie in [8, {_MAX_SIDE}]")
        return int(value)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def child(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), f"{self._where}.{key}")
