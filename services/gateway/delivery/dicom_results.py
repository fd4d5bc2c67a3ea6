"""AI results as DICOM objects that go back to the PACS: a Comprehensive SR (TID 1500
Measurement Report) for classification findings and a Segmentation (SEG) for segmentation maps.

Both are built with highdicom, which copies the source's patient and study attributes (the
result files into the same study, beside the images it is about), gives them a new SOP
Instance UID, and records the source instances as evidence. The worker calls ``build_sr`` /
``build_seg`` with what ``InferenceCore.analyze`` returned; delivery (C-STORE SCU, STOW-RS) is
not done here.

What IHE AI Results (AIR) asks of every result, and how it is met here:
- the algorithm is identified in the content (TID 4019 in each SR measurement group, the
  Segment Algorithm Name/Family/Identification in each SEG segment) and as equipment: the
  Contributing Equipment Sequence carries, after the source's acquisition equipment and before
  the highdicom library, a "Processing Algorithm" item (``(1630, 99IHE)``) naming the model's
  manufacturer, name and version with a Device UID derived from the three, so a new model
  version is a new device;
- all results of one study, model (name and version) and kind (SR or SEG) share one series:
  its Series Instance UID and Series Number are derived from those four values
  (``result_series``), not stored, so they are the same after a restart, on every replica and
  for a group offered again after a crash; the number lies in 90000-99999, above the numbers
  modalities usually give, and differs between kinds and models of one study unless two
  hashes collide (1 in 10000 per pair);
- an SR's Present/Absent evaluation of each label sits in the report's "Qualitative
  Evaluations" container (TID 1500 rows 12-13, concept name: the label, value: SNOMED CT
  Present/Absent), and each label's measurement group (TID 1501) names the label as its Finding
  (row 3b) with the model's score (TID 300) - no content item outside the templates;
- a SEG carries the source's Body Part Examined and laterality (as Image Laterality; see
  ``_copy_anatomy``).

Derived UIDs are ``2.25.`` UIDs of name-based (RFC 4122 version 5) UUIDs in a namespace of the
project's own: ``2.25`` is the root PS3.5 B.2 gives UUID-derived UIDs, so none needs a
registered root, and nothing but the inputs decides them.

Labels have no standard codes in a manifest, so each label is coded in the private coding scheme
``99BEDSIDE`` (PS3.16 8.2: a "99" prefix marks a local scheme) with the label as its meaning;
the segment / finding category is SNOMED CT "Morphologically abnormal structure".
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from optimizer.contract.manifest import Manifest
from optimizer.contract.preprocess import resize
from services.gateway.errors import DicomResultError

PRIVATE_SCHEME = "99BEDSIDE"
MODEL_SCORE = CodedConcept("SCORE", PRIVATE_SCHEME, "Model score")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
# IHE AIR: the Purpose of Reference of the Contributing Equipment item naming the algorithm.
IHE_SCHEME = "99IHE"
PROCESSING_ALGORITHM = CodedConcept("1630", IHE_SCHEME, "Processing Algorithm")
# TID 1500 row 12: the report's container of qualitative evaluations.
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
# The namespace of the name-based UUIDs behind derived UIDs (fixed forever: changing it would
# change every derived UID, and results of one study would land in two series).
UID_NAMESPACE = uuid.UUID("5f0c3f57-6a52-4d1e-9a8e-2b9b0d7c41a6")
SERIES_NUMBER_BASE = 90000
SERIES_NUMBER_SPAN = 10000
ResultKind = Literal["SR", "SEG"]
_CODE_VALUE = re.compile(r"^[A-Za-z0-9_.\-]{1,16}$")


@dataclass(frozen=True)
class ResultDevice:
    """Who made the result, as written into the SR observer context and the SEG equipment
    module: the configurable manufacturer and device name a PACS shows."""

    manufacturer: str = "Bedside"
    device_name: str = "Bedside AI gateway"
    software_version: str = "0.1.0"
    serial_number: str = "0"
    # A stable UID for the device observer (TID 1004); derived from the name when empty.
    device_uid: str = ""

    def __post_init__(self) -> None:
        if not self.manufacturer.strip() or not self.device_name.strip():
            raise ValueError("manufacturer and device_name must not be empty")
        if len(self.manufacturer) > 64 or len(self.device_name) > 64:
            raise ValueError("manufacturer and device_name: at most 64 characters (LO)")

    @property
    def observer_uid(self) -> str:
        return self.device_uid or generate_uid(entropy_srcs=[self.manufacturer,
                                                             self.device_name])


DEFAULT_DEVICE = ResultDevice()


def derived_uid(*parts: str) -> str:
    """A UID that only ``parts`` decide: ``2.25.`` and a name-based UUID of them."""
    name = "\x1f".join(parts)  # unit separator: ("a", "bc") and ("ab", "c") differ
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


def model_manufacturer(manifest: Manifest, device: ResultDevice) -> str:
    """Who made the model: the manifest's manufacturer, else the gateway's (configured)."""
    return manifest.manufacturer or device.manufacturer


def algorithm_device_uid(manifest: Manifest, device: ResultDevice) -> str:
    """The model as a device: one UID per manufacturer, model name and version."""
    return derived_uid("algorithm", model_manufacturer(manifest, device), manifest.name,
                       str(manifest.version))


def result_series(study_uid: str, manifest: Manifest, kind: ResultKind) -> tuple[str, int]:
    """The Series Instance UID and Series Number of every ``kind`` result of one study by one
    model version (see the module docstring)."""
    parts = ("series", study_uid, manifest.name, str(manifest.version), kind)
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    number = SERIES_NUMBER_BASE + int.from_bytes(digest[:8], "big") % SERIES_NUMBER_SPAN
    return derived_uid(*parts), number


def algorithm_equipment(manifest: Manifest,
                        device: ResultDevice) -> hd.ContributingEquipment:
    """IHE AIR's Contributing Equipment item for the model: Purpose of Reference "Processing
    Algorithm", the model's manufacturer, name (Manufacturer's Model Name), version (Software
    Versions) and Device UID."""
    item = hd.ContributingEquipment(
        manufacturer=model_manufacturer(manifest, device),
        purpose_of_reference=codes.DCM.ProcessingEquipment,  # replaced below
        manufacturer_model_name=manifest.name,
        software_versions=str(manifest.version),
        contribution_description="AI model that produced this result")
    # highdicom accepts only CID 7005 purposes; AIR's own code replaces it (one item: the
    # sequence holds a single purpose).
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = algorithm_device_uid(manifest, device)
    return item


def _instance_number(sources: Sequence[Dataset]) -> int:
    """The lowest Instance Number of the sources (a result about instance 7 is result 7 of
    its series), else 1."""
    numbers = [int(ds.InstanceNumber) for ds in sources
               if str(ds.get("InstanceNumber", "")).strip().lstrip("-").isdigit()]
    return max(1, min(numbers)) if numbers else 1


def label_code(label: str, index: int) -> CodedConcept:
    """A label as a private code: the label itself when it is a valid code value, else
    ``LABEL<n>``; the meaning is always the label."""
    value = label if _CODE_VALUE.match(label) else f"LABEL{index + 1}"
    return CodedConcept(value, PRIVATE_SCHEME, label[:64])


def _algorithm(manifest: Manifest,
               parameters: Mapping[str, str] | None = None) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=manifest.name, family=codes.cid7162.ArtificialIntelligence,
        version=str(manifest.version), parameters=dict(parameters or {}) or None)


def _check_sources(sources: Sequence[Dataset]) -> None:
    if not sources:
        raise DicomResultError("a DICOM result needs at least one source instance",
                               "result_no_source")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in sources}
    if len(studies) != 1 or "" in studies:
        raise DicomResultError("source instances must belong to one study",
                               "result_mixed_studies")


def build_sr(sources: Sequence[Dataset], findings: Sequence[Mapping[str, Any]],
             manifest: Manifest, device: ResultDevice = DEFAULT_DEVICE) -> Dataset:
    """A Comprehensive SR holding a TID 1500 Measurement Report: one measurement group
    (TID 1501) per label - the label as its Finding, the model's score, the algorithm (model
    name and version, threshold) and the source images - and, in the report's Qualitative
    Evaluations, each label Present or Absent at its threshold.

    ``findings`` is ``Result.findings`` of a classification model (label, score, threshold,
    positive, optionally frame). The series is the study's SR series of this model version
    (``result_series``).
    """
    _check_sources(sources)
    if manifest.task != "classification":
        raise DicomResultError("an SR is built for classification findings; segmentation "
                               "results become a SEG", "result_wrong_task")
    by_label = {str(f.get("label")): f for f in findings}
    missing = [label for label in manifest.output.labels if label not in by_label]
    if missing:
        raise DicomResultError(f"findings lack labels {missing}", "result_findings")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device.observer_uid, name=device.device_name,
            manufacturer_name=device.manufacturer, model_name=manifest.name,
            serial_number=device.serial_number))
    context = hd.sr.ObservationContext(observer_device_context=observer)
    groups = []
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    evaluations.ContentSequence = hd.sr.ContentSequence(is_root=False)
    for k, label in enumerate(manifest.output.labels):
        finding = by_label[label]
        score, threshold = float(finding["score"]), float(finding["threshold"])
        code = label_code(label, k)
        algorithm = hd.sr.AlgorithmIdentification(
            name=manifest.name, version=str(manifest.version),
            parameters=[f"threshold={threshold:g}"])
        images = _source_images(sources, finding.get("frame"))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                         identifier=label[:64]),
            finding_type=code,
            algorithm_id=algorithm,
            source_images=images,
            measurements=[hd.sr.Measurement(name=MODEL_SCORE, value=score, unit=NO_UNITS,
                                            algorithm_id=algorithm)],
        ))
        evaluations.ContentSequence.append(hd.sr.CodeContentItem(
            name=code, value=codes.SCT.Present if score >= threshold else codes.SCT.Absent,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    report[0].ContentSequence.append(evaluations)  # TID 1500 row 12, after the measurements
    series_uid, series_number = result_series(str(sources[0].StudyInstanceUID), manifest, "SR")
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources), content=report, series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=generate_uid(),
        instance_number=_instance_number(sources),
        manufacturer=device.manufacturer, is_complete=True, is_final=False,
        is_verified=False, contributing_equipment=[algorithm_equipment(manifest, device)])
    sr.CodingSchemeIdentificationSequence = _coding_schemes()
    sr.SeriesDescription = f"AI findings: {manifest.name} v{manifest.version}"[:64]
    sr.ManufacturerModelName = device.device_name
    sr.SoftwareVersions = device.software_version
    sr.DeviceSerialNumber = device.serial_number
    return sr


def _coding_schemes() -> list[Dataset]:
    """PS3.3 C.12.1.1.2: the private coding schemes used in the object are identified in it."""
    items = []
    for designator, name, organization in (
            (PRIVATE_SCHEME, "Bedside model labels", "Bedside"),
            (IHE_SCHEME, "IHE Radiology codes", "IHE International")):
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = organization
        items.append(item)
    return items


def _source_images(sources: Sequence[Dataset],
                   frame: object) -> list[hd.sr.SourceImageForMeasurementGroup]:
    images = []
    for ds in sources:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 and isinstance(frame, int) and 1 <= frame <= frames:
            images.append(hd.sr.SourceImageForMeasurementGroup.from_source_image(
                ds, referenced_frame_numbers=[frame]))
        else:
            images.append(hd.sr.SourceImageForMeasurementGroup.from_source_image(ds))
    return images


def source_masks(sources: Sequence[Dataset], maps: np.ndarray, manifest: Manifest,
                 fractional: bool) -> np.ndarray:
    """Model-resolution class maps -> (frames, Rows, Columns, classes) at the source geometry:
    binary (at each class's threshold) or probabilities in [0, 1].

    ``maps`` is ``Result.maps``: (frames, classes, h, w) for 2-D models (one frame per source
    instance, or every frame of one multi-frame source), or (1, classes, depth, h, w) for 3-D
    models (the depth is resampled back to the source's frames)."""
    classes = len(manifest.output.labels)
    rows = {int(ds.Rows) for ds in sources}
    cols = {int(ds.Columns) for ds in sources}
    if len(rows) != 1 or len(cols) != 1:
        raise DicomResultError("source images must share Rows and Columns", "result_geometry")
    height, width = rows.pop(), cols.pop()
    total_frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in sources)
    if manifest.input.depth is not None:
        if maps.ndim != 5 or maps.shape[:2] != (1, classes):
            raise DicomResultError(f"3-D maps must have shape (1, {classes}, d, h, w), got "
                                   f"{maps.shape}", "result_mask_shape")
        volume = maps[0]  # (classes, depth, h, w) -> resample depth to the source frames
        flat = volume.transpose(1, 0, 2, 3).reshape(volume.shape[1], -1).astype(np.float32)
        maps = resize(flat, total_frames, flat.shape[1]).reshape(
            total_frames, classes, *volume.shape[2:])
    if maps.ndim != 4 or maps.shape[1] != classes:
        raise DicomResultError(f"maps must have shape (frames, {classes}, h, w), got "
                               f"{maps.shape}", "result_mask_shape")
    if maps.shape[0] != total_frames:
        raise DicomResultError(
            f"{maps.shape[0]} mask frame(s) for {total_frames} source frame(s): a SEG must "
            "cover every source frame (infer multi-frame instances with frames: all)",
            "result_mask_frames")
    out = np.empty((total_frames, height, width, classes), dtype=np.float32)
    for f in range(total_frames):
        for k in range(classes):
            out[f, :, :, k] = resize(maps[f, k].astype(np.float32), height, width)
    if fractional:
        return np.clip(out, 0.0, 1.0)
    thresholds = np.asarray(manifest.output.thresholds, dtype=np.float32)
    return out >= thresholds


def build_seg(sources: Sequence[Dataset], maps: np.ndarray, manifest: Manifest,
              device: ResultDevice = DEFAULT_DEVICE, fractional: bool = False) -> Dataset:
    """A DICOM Segmentation with one segment per output class of a segmentation manifest, at
    the source images' geometry, referencing them (see ``source_masks`` for ``maps``), in the
    study's SEG series of this model version (``result_series``).

    BINARY segments threshold each class map at its manifest threshold; ``fractional`` keeps
    the probabilities (FRACTIONAL / PROBABILITY, 8-bit)."""
    _check_sources(sources)
    if manifest.task != "segmentation":
        raise DicomResultError("a SEG is built from a segmentation model's maps",
                               "result_wrong_task")
    frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in sources)
    if frames > 1 and not all("FrameOfReferenceUID" in ds for ds in sources):
        raise DicomResultError(
            "a SEG of several frames needs sources with a Frame of Reference (their geometry "
            "places the frames); projection images get one SEG per instance",
            "result_no_frame_of_reference")
    masks = source_masks(sources, maps, manifest, fractional)
    algorithm = _algorithm(manifest)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k + 1, segment_label=label[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=label_code(label, k),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(), tracking_id=label[:64])
        for k, label in enumerate(manifest.output.labels)]
    series_uid, series_number = result_series(str(sources[0].StudyInstanceUID), manifest,
                                              "SEG")
    seg = hd.seg.Segmentation(  # 4-D (frames, rows, columns, segments): never ambiguous
        source_images=list(sources), pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
        else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=_instance_number(sources),
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.device_name,
        software_versions=device.software_version,
        device_serial_number=device.serial_number,
        omit_empty_frames=False,
        contributing_equipment=[algorithm_equipment(manifest, device)],
    )
    if "FrameOfReferenceUID" not in seg:
        # General Image, Type 2C: needed where no plane orientation places the frames
        # (projection radiographs); the source's own value, else present and empty.
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")
    _copy_anatomy(seg, sources)
    seg.CodingSchemeIdentificationSequence = _coding_schemes()
    seg.SeriesDescription = f"AI segmentation: {manifest.name} v{manifest.version}"[:64]
    return seg


def _shared_value(sources: Sequence[Dataset], keyword: str) -> str | None:
    """``keyword``'s value when every source has the same non-empty one, else None."""
    values = {str(ds.get(keyword, "") or "").strip() for ds in sources}
    return values.pop() if len(values) == 1 and "" not in values else None


def _copy_anatomy(seg: Dataset, sources: Sequence[Dataset]) -> None:
    """The source's Body Part Examined (General Series) and laterality, written as the SEG's
    Image Laterality (General Image: R, L, U or B): the source's Image Laterality, else an
    enhanced source's shared Frame Laterality, else its series' Laterality (R or L).

    General Series Laterality is never written: PS3.3 C.7.3.1 requires it (Type 2C) only "if
    the body part examined is a paired structure and Image Laterality (0020,0062) or Frame
    Laterality (0020,9072) or Measurement Laterality (0024,0113) are not present", so with
    Image Laterality written it must be absent (PS3.5 7.4.4); dciodvfy also refuses it in a
    SEG. Copied only where every source agrees; nothing is invented where they say nothing."""
    body_part = _shared_value(sources, "BodyPartExamined")
    if body_part is not None:
        seg.BodyPartExamined = body_part
    laterality = _shared_value(sources, "ImageLaterality")
    if laterality is None:
        frame = {_frame_laterality(ds) for ds in sources}
        laterality = frame.pop() if len(frame) == 1 else None
    if laterality is None:
        laterality = _shared_value(sources, "Laterality")
    if laterality in ("R", "L", "U", "B"):
        seg.ImageLaterality = laterality


def _frame_laterality(ds: Dataset) -> str | None:
    try:
        shared = ds.SharedFunctionalGroupsSequence[0]
        return str(shared.FrameAnatomySequence[0].FrameLaterality)
    except (AttributeError, IndexError):
        return None

