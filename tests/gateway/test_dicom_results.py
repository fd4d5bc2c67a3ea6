"""DICOM results: the SR (TID 1500) and SEG the gateway writes, checked for content and with
dciodvfy (dicom3tools), the reference IOD validator.

dciodvfy prints one line per problem to stderr, starting "Error -" or "Warning -". A test fails
on any of them except the few that ``tests/gateway/dicom_validators.py`` lists with the
standard's text (the local label scheme 99BEDSIDE, which dciodvfy cannot know; the Device UID
IHE AI Results asks for in the Contributing Equipment item). PixelMed's validators and what IHE
AI Results asks of a result are tested in ``test_air_conformance.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from optimizer.contract.manifest import Manifest, Normalize
from optimizer.contract.preprocess import preprocess, resize
from services.gateway.delivery.dicom_results import (
    DicomResultError,
    ResultDevice,
    build_seg,
    build_sr,
    label_code,
)
from services.gateway.inference.core import InferenceCore
from tests.conftest import TINY_MANIFEST
from tests.gateway import dicom_validators
from tests.gateway.fakes import FakeInferer
from tests.gateway.util import make_instance
from tests.optimizer.pixel_data import make_dataset, smooth_image

DEVICE = ResultDevice(manufacturer="Acme Hospital AI", device_name="Acme Reader 1")
CLASSIFIER = dataclasses.replace(TINY_MANIFEST, output=dataclasses.replace(
    TINY_MANIFEST.output, labels=("lesion", "pleural effusion"), thresholds=(0.5, 0.3)))
SEGMENTER = dataclasses.replace(CLASSIFIER, task="segmentation")
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                 "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "AccessionNumber",
                 "ReferringPhysicianName")


def dciodvfy(ds: Dataset, path: Path) -> list[str]:
    """Write ``ds`` and validate it; returns the problems that count (see module docstring)."""
    return dicom_validators.dciodvfy_problems(ds, path)


def _assert_copied_from(result: Dataset, source: Dataset) -> None:
    for keyword in PATIENT_STUDY:
        assert result.get(keyword) == source.get(keyword), keyword
    assert result.SeriesInstanceUID != source.SeriesInstanceUID
    assert result.SOPInstanceUID != source.SOPInstanceUID
    assert result.Manufacturer == "Acme Hospital AI"


def _findings(scores: dict[str, float]) -> list[dict[str, object]]:
    thresholds = dict(zip(CLASSIFIER.output.labels, CLASSIFIER.output.thresholds, strict=True))
    return [{"label": k, "score": v, "threshold": thresholds[k], "positive": v >= thresholds[k]}
            for k, v in scores.items()]


# ----- SR -----


def test_sr_is_a_valid_tid_1500_report_of_each_label(tmp_path: Path) -> None:
    source = make_instance()
    sr = build_sr([source], _findings({"lesion": 0.8125, "pleural effusion": 0.125}),
                  CLASSIFIER, DEVICE)
    assert dciodvfy(sr, tmp_path / "sr.dcm") == []
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    _assert_copied_from(sr, source)
    assert sr.Modality == "SR" and sr.ManufacturerModelName == "Acme Reader 1"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID

    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(tmp_path / "sr.dcm")])
    groups = {g.finding_type.meaning: g for g in report.get_image_measurement_groups()}
    assert set(groups) == {"lesion", "pleural effusion"}
    lesion, effusion = groups["lesion"], groups["pleural effusion"]
    assert lesion.get_measurements()[0].value == pytest.approx(0.8125)
    assert effusion.get_measurements()[0].value == pytest.approx(0.125)
    # Present/Absent per label: the report's Qualitative Evaluations (TID 1500 row 12-13).
    (evaluations,) = [i for i in sr.ContentSequence
                      if i.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    verdicts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.ConceptCodeSequence[0].CodeValue
                for i in evaluations.ContentSequence}
    assert verdicts == {"lesion": codes.SCT.Present.value,
                        "pleural effusion": codes.SCT.Absent.value}
    assert [i.referenced_sop_instance_uid for i in lesion.source_images] == [
        source.SOPInstanceUID]
    texts = {(i.ConceptNameCodeSequence[0].CodeMeaning, i.TextValue) for i in _walk(lesion[0])
             if i.get("ValueType") == "TEXT"}
    assert {("Algorithm Name", "tiny-cxr"), ("Algorithm Version", "1"),
            ("Algorithm Parameters", "threshold=0.5")} <= texts
    assert effusion.finding_type == label_code("pleural effusion", 1)
    assert effusion.finding_type.value == "LABEL2"  # spaces are not code values


def test_sr_from_the_gateway_core_result(tmp_path: Path) -> None:
    source = make_instance(3)
    result = InferenceCore(TINY_MANIFEST, FakeInferer()).analyze(source)
    sr = build_sr([source], result.findings, TINY_MANIFEST, DEVICE)
    assert dciodvfy(sr, tmp_path / "sr.dcm") == []


def test_sr_references_the_frame_of_a_multiframe_source(tmp_path: Path) -> None:
    source = make_dataset(smooth_image(32, 32, 0, 4095, frames=4), bits_stored=12, frames=4,
                          modality="CR")
    findings = [dict(f, frame=3) for f in _findings({"lesion": 0.9, "pleural effusion": 0.1})]
    sr = build_sr([source], findings, CLASSIFIER, DEVICE)
    assert dciodvfy(sr, tmp_path / "sr.dcm") == []
    assert any(getattr(e, "ReferencedFrameNumber", None) == 3 for e in _walk(sr))


def _walk(ds: Dataset) -> list[Dataset]:
    out = []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                out.append(item)
                out.extend(_walk(item))
    return out


def test_sr_refusals() -> None:
    source = make_instance()
    with pytest.raises(DicomResultError, match="lack labels"):
        build_sr([source], _findings({"lesion": 0.8}), CLASSIFIER)
    with pytest.raises(DicomResultError, match="at least one source"):
        build_sr([], _findings({"lesion": 0.8, "pleural effusion": 0.1}), CLASSIFIER)
    other = make_instance(1)  # another study
    with pytest.raises(DicomResultError, match="one study"):
        build_sr([source, other], _findings({"lesion": 0.8, "pleural effusion": 0.1}),
                 CLASSIFIER)
    with pytest.raises(DicomResultError, match="SEG"):
        build_sr([source], [], SEGMENTER)


def test_device_names_are_validated() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        ResultDevice(manufacturer=" ")
    with pytest.raises(ValueError, match="64 characters"):
        ResultDevice(device_name="x" * 65)


# ----- SEG -----


def _maps(frames: int, size: int = 64) -> np.ndarray:
    """Class 0: a block in the upper left; class 1: a ramp of probabilities left to right."""
    maps = np.zeros((frames, 2, size, size), np.float32)
    maps[:, 0, 8:24, 8:40] = 0.9
    maps[:, 1] = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :]
    return maps


@pytest.mark.parametrize("fractional", [False, True], ids=["binary", "fractional"])
def test_seg_at_source_geometry_for_a_radiograph(tmp_path: Path, fractional: bool) -> None:
    source = make_instance(size=128)  # the model saw 64x64; the SEG is 128x128 again
    maps = _maps(1)
    seg = build_seg([source], maps, SEGMENTER, DEVICE, fractional=fractional)
    assert dciodvfy(seg, tmp_path / "seg.dcm") == []
    _assert_copied_from(seg, source)
    assert (seg.Rows, seg.Columns) == (128, 128)
    assert seg.SegmentationType == ("FRACTIONAL" if fractional else "BINARY")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion", "pleural effusion"]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "tiny-cxr"
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] \
        .ReferencedSOPInstanceUID == source.SOPInstanceUID

    frames = _segment_frames(tmp_path / "seg.dcm")
    for k, threshold in enumerate(SEGMENTER.output.thresholds):
        expected = resize(maps[0, k], 128, 128)
        if fractional:  # 8-bit probabilities
            np.testing.assert_allclose(frames[k + 1] / 255.0, np.clip(expected, 0, 1),
                                       atol=1 / 255 + 1e-6)
        else:
            np.testing.assert_array_equal(frames[k + 1].astype(bool), expected >= threshold)
    if not fractional:  # the block, scaled back 2x: rows 16..47, columns 16..79
        got = frames[1].astype(bool)
        assert got[20:44, 20:76].all() and not got[:12].any() and not got[:, 84:].any()


def _segment_frames(path: Path) -> dict[int, np.ndarray]:
    """Segment number -> its frame, read with pydicom alone (highdicom's reader asks for a
    Slice Thickness that a projection radiograph's SEG has no reason to carry)."""
    seg = pydicom.dcmread(path)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    return {int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber): pixels[i]
            for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence)}


def test_seg_of_an_empty_mask_is_valid(tmp_path: Path) -> None:
    seg = build_seg([make_instance()], np.zeros((1, 2, 64, 64)), SEGMENTER, DEVICE)
    assert dciodvfy(seg, tmp_path / "seg.dcm") == []


def _ct_series(slices: int) -> list[Dataset]:
    """A CT series with a Frame of Reference: pydicom's CT_small.dcm, stacked 5 mm apart."""
    ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ct.PatientWeight = 70  # the test file says 0, which dciodvfy (rightly) warns about
    series = []
    x, y, z = (float(v) for v in ct.ImagePositionPatient)
    for i in range(slices):
        s = copy.deepcopy(ct)
        s.SOPInstanceUID = s.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        s.ImagePositionPatient = [f"{v:.4f}" for v in (x, y, z + 5.0 * i)]
        s.InstanceNumber = i + 1
        series.append(s)
    return series


def test_seg_of_a_ct_series(tmp_path: Path) -> None:
    series = _ct_series(3)
    seg = build_seg(series, _maps(3), SEGMENTER, DEVICE)
    assert dciodvfy(seg, tmp_path / "seg.dcm") == []
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    _assert_copied_from(seg, series[0])


def test_seg_of_a_3d_model_on_an_enhanced_ct(tmp_path: Path) -> None:
    """Legacy-converted enhanced CT (multi-frame, functional groups): the volume goes through
    preprocessing (per-frame modality LUT from the functional groups) and the 3-D model's
    maps, at its own depth, come back as one SEG frame per source frame."""
    series = _ct_series(4)
    volume = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=series, series_instance_uid=generate_uid(), series_number=5,
        sop_instance_uid=generate_uid(), instance_number=1)
    spec = dataclasses.replace(SEGMENTER.input, modalities=("CT",), depth=8, height=32,
                               width=32, voi="minmax", normalize=Normalize(0.0, 1.0))
    manifest = dataclasses.replace(SEGMENTER, input=spec)
    x = preprocess(volume, spec)
    assert x.shape == (1, 8, 32, 32)
    maps = np.zeros((1, 2, 8, 32, 32), np.float32)
    maps[0, 0, :4, :16, :16] = 1.0  # lesion in the first half of the volume
    seg = build_seg([volume], maps, manifest, DEVICE)
    assert dciodvfy(seg, tmp_path / "seg.dcm") == []
    back = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = back.get_pixels_by_source_frame(volume.SOPInstanceUID, [1, 2, 3, 4],
                                             segment_numbers=[1])[..., 0]
    assert pixels[:2, :60, :60].all() and not pixels[2:].any()


def test_seg_refusals() -> None:
    source = make_instance()
    with pytest.raises(DicomResultError, match=r"classification|segmentation model"):
        build_seg([source], _maps(1), CLASSIFIER)
    with pytest.raises(DicomResultError, match=r"shape \(frames, 2, h, w\)"):
        build_seg([source], np.zeros((1, 3, 64, 64)), SEGMENTER)
    a, b = make_instance(0), make_instance(1)
    b.StudyInstanceUID = a.StudyInstanceUID
    with pytest.raises(DicomResultError, match="Frame of Reference"):
        build_seg([a, b], _maps(2), SEGMENTER)
    series = _ct_series(3)
    with pytest.raises(DicomResultError, match=r"1 mask frame.* for 3 source frame"):
        build_seg(series, _maps(1), SEGMENTER)


# ----- the gateway core hands over what the builders need -----


class _SegInferer:
    model = "tiny-seg"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        logits = np.full((batch.shape[0], 2, 64, 64), -5.0, np.float32)
        logits[:, 0, 8:24, 8:40] = 5.0
        return logits


def test_core_segmentation_result_becomes_a_seg(tmp_path: Path) -> None:
    source = make_instance(size=128)
    result = InferenceCore(SEGMENTER, _SegInferer()).analyze(source)
    assert result.maps is not None and result.maps.shape == (1, 2, 64, 64)
    assert "maps" not in result.to_dict()
    assert [f["positive"] for f in result.findings] == [True, False]
    seg = build_seg([source], result.maps, SEGMENTER, DEVICE)
    assert dciodvfy(seg, tmp_path / "seg.dcm") == []


def test_core_infers_every_frame_when_the_manifest_says_all() -> None:
    frames = np.stack([np.full((64, 64), v) for v in (100, 3000, 500)])
    source = make_dataset(frames, bits_stored=12, frames=3, modality="CR")
    source.WindowCenter, source.WindowWidth = 2048, 4096
    manifest: Manifest = dataclasses.replace(TINY_MANIFEST, input=dataclasses.replace(
        TINY_MANIFEST.input, frames="all"))
    inferer = FakeInferer()  # score = sigmoid(mean of the normalised input)
    result = InferenceCore(manifest, inferer).analyze(source)
    assert inferer.calls == 3  # one call per frame
    [finding] = result.findings
    assert finding["frame"] == 2  # the brightest frame scores highest
    middle = InferenceCore(TINY_MANIFEST, FakeInferer()).analyze(source)
    assert middle.findings[0]["score"] == finding["score"]  # the middle frame is frame 2
    assert "frame" not in middle.findings[0]


def test_building_sr_and_seg_in_a_started_gateway_logs_no_raw_uid(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """highdicom logs "copy Patient-related attributes from dataset <UID>" at INFO; the
    gateway's start keeps the libraries that quote identifiers above INFO."""
    from tests.gateway.harness import fake_gateway

    fake_gateway(tmp_path / "gw").stop()
    caplog.set_level(logging.DEBUG)
    source = make_instance(size=128)
    build_sr([source], _findings({"lesion": 0.8, "pleural effusion": 0.1}), CLASSIFIER, DEVICE)
    build_seg([source], _maps(1), SEGMENTER, DEVICE)
    logging.getLogger("services.gateway.delivery").debug("scan marker")
    assert "scan marker" in caplog.text  # DEBUG records are captured
    for uid in (source.SOPInstanceUID, source.StudyInstanceUID, source.SeriesInstanceUID):
        assert uid not in caplog.text
