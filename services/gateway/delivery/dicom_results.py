"""AI results as DICOM objects that go back to the PACS: a Comprehensive SR (TID 1500
Measurement Report) for classification findings and a Segmentation (SEG) for segmentation maps.

Both are built with highdicom, which copies the source's patient and study attributes (the
result files into the same study, beside the images it is about), gives them new SOP and
Series Instance UIDs, and records the source instances as evidence. The worker calls
``build_sr`` / ``build_seg`` with what ``InferenceCore.analyze`` returned; delivery (C-STORE
SCU, STOW-RS) is not done here.

Labels have no standard codes in a manifest, so each label is coded in the private coding scheme
``99BEDSIDE`` (PS3.16 8.2: a "99" prefix marks a local scheme) with the label as its meaning;
the segment / finding category is SNOMED CT "Morphologically abnormal structure".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    sr_series_number: int = 9901
    seg_series_number: int = 9902

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
             manifest: Manifest, device: ResultDevice = DEFAULT_DEVICE,
             series_instance_uid: str | None = None) -> Dataset:
    """A Comprehensive SR holding a TID 1500 Measurement Report: one measurement group
    (TID 1501) per label with the model's score and a Present/Absent evaluation at the label's
    threshold, the algorithm (model name and version, threshold) and the source images.

    ``findings`` is ``Result.findings`` of a classification model (label, score, threshold,
    positive, optionally frame). ``series_instance_uid`` lets several results share a series.
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
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=code, value=codes.SCT.Present if score >= threshold
                else codes.SCT.Absent)],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources), content=report, series_instance_uid=series_instance_uid
        or generate_uid(), series_number=device.sr_series_number,
        sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=device.manufacturer, is_complete=True, is_final=False,
        is_verified=False)
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    sr.SeriesDescription = f"AI findings: {manifest.name} v{manifest.version}"[:64]
    sr.ManufacturerModelName = device.device_name
    sr.SoftwareVersions = device.software_version
    sr.DeviceSerialNumber = device.serial_number
    return sr


def _private_scheme() -> Dataset:
    """PS3.3 C.12.1.1.2: a private coding scheme used in the object is identified in it."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "Bedside model labels"
    item.CodingSchemeResponsibleOrganization = "Bedside"
    return item


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
              device: ResultDevice = DEFAULT_DEVICE, fractional: bool = False,
              series_instance_uid: str | None = None) -> Dataset:
    """A DICOM Segmentation with one segment per output class of a segmentation manifest, at
    the source images' geometry, referencing them (see ``source_masks`` for ``maps``).

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
    seg = hd.seg.Segmentation(  # 4-D (frames, rows, columns, segments): never ambiguous
        source_images=list(sources), pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
        else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=device.seg_series_number, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=device.manufacturer,
        manufacturer_model_name=device.device_name,
        software_versions=device.software_version,
        device_serial_number=device.serial_number,
        omit_empty_frames=False,
    )
    if "FrameOfReferenceUID" not in seg:
        # General Image, Type 2C: needed where no plane orientation places the frames
        # (projection radiographs); the source's own value, else present and empty.
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")
    seg.CodingSchemeIdentificationSequence = [_private_scheme()]
    seg.SeriesDescription = f"AI segmentation: {manifest.name} v{manifest.version}"[:64]
    return seg

