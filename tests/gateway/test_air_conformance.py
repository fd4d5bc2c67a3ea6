"""IHE AI Results conformance of the SR and SEG the gateway writes: every object is checked by
dciodvfy and by PixelMed's DicomSRValidator / DicomInstanceValidator (all PixelMed runs in one
JVM), failing on any finding that ``tests/gateway/dicom_validators.py`` does not list with the
standard's text; and what AIR asks of a result: the Processing Algorithm equipment item, a
device UID per model version, one series per study, model and kind, the source's anatomy on a
SEG.

Objects: SRs (TID 1500/1501) of the demo model's findings on a CR and on a CT source; SEGs
(binary and fractional) of a radiograph, of knee radiographs (image or series laterality), of
a CT series and of a 3-D model on an enhanced CT. Two negative controls prove the validators
catch what they should: the old SR encoding (a label-named evaluation inside TID 1501) and a
SEG missing a Type 1 attribute.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from optimizer.contract.manifest import AccuracyBudget, Manifest, Normalize
from services.gateway.delivery.dicom_results import (
    QUALITATIVE_EVALUATIONS,
    SERIES_NUMBER_BASE,
    SERIES_NUMBER_SPAN,
    ResultDevice,
    algorithm_device_uid,
    build_seg,
    build_sr,
    label_code,
    result_series,
)
from services.gateway.delivery.routing import DimseDestination, Route, RoutesConfig
from services.gateway.delivery.service import DeliveryService
from services.gateway.metrics import GatewayMetrics
from tests.conftest import TINY_MANIFEST
from tests.gateway import dicom_validators as validators
from tests.gateway.groups import RecordingSender, findings, make_group
from tests.gateway.test_dicom_results import SEGMENTER, _ct_series, _maps
from tests.gateway.util import make_instance

ROOT = Path(__file__).resolve().parents[2]
# The demo model's manifest (services/demo.py's DEMO_MANIFEST, which imports the optimizer's
# torch side: gateway tests must collect without torch, tests/gateway/test_torch_free.py).
DEMO_MANIFEST = dataclasses.replace(
    TINY_MANIFEST, name="cxr-lesion", latency_slo_ms=50.0,
    input=dataclasses.replace(TINY_MANIFEST.input, height=128, width=128),
    accuracy_budget=AccuracyBudget(max_auc_drop=0.005, min_agreement=0.99))
DEVICE = ResultDevice(manufacturer="Acme Hospital AI", device_name="Acme Reader 1")
CT_CLASSIFIER = dataclasses.replace(DEMO_MANIFEST, name="ct-nodule", input=dataclasses.replace(
    DEMO_MANIFEST.input, modalities=("CT",)))
STUDY = "1.2.826.0.1.3680043.8.498.77001"  # fixed: series numbers must not vary run to run
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.77002"


def _algorithm_item(ds: Dataset) -> Dataset:
    (item,) = [i for i in ds.ContributingEquipmentSequence
               if i.PurposeOfReferenceCodeSequence[0].CodeValue == "1630"]
    return item


def _cr(size: int = 128, **attributes: str) -> Dataset:
    ds = make_instance(size=size)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _right_knee() -> Dataset:
    """A radiograph whose only laterality is the series' (General Series Laterality)."""
    ds = _cr(BodyPartExamined="KNEE", Laterality="R")
    del ds.ImageLaterality
    return ds


def _enhanced_ct() -> tuple[Dataset, Manifest]:
    series = _ct_series(4)
    volume = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=series, series_instance_uid=generate_uid(), series_number=5,
        sop_instance_uid=generate_uid(), instance_number=1)
    spec = dataclasses.replace(SEGMENTER.input, modalities=("CT",), depth=8, height=32,
                               width=32, voi="minmax", normalize=Normalize(0.0, 1.0))
    return volume, dataclasses.replace(SEGMENTER, input=spec)


def _old_sr_encoding(source: Dataset) -> Dataset:
    """The encoding before this change: a Present/Absent CODE named after the label inside
    TID 1501, which PixelMed reports as outside the template."""
    label = label_code("lesion", 0)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="lesion"),
        finding_type=label,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=label,
                                                             value=codes.SCT.Present)])
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report, series_instance_uid=generate_uid(),
        series_number=1, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="x")


def _objects() -> dict[str, Dataset]:
    """Every object the tests validate, by name."""
    cr = _cr()
    ct = _ct_series(3)
    for ds in ct:
        ds.BodyPartExamined = "CHEST"  # a CT of the chest: an unpaired part, no laterality
    volume, manifest_3d = _enhanced_ct()
    maps_3d = np.zeros((1, 2, 8, 32, 32), np.float32)
    maps_3d[0, 0, :4, :16, :16] = 1.0
    demo_findings = findings(DEMO_MANIFEST, [0.75])
    broken = build_seg([_cr()], _maps(1), SEGMENTER, DEVICE)
    del broken.SegmentSequence[0].SegmentLabel  # Type 1 in the Segment Description macro
    return {
        "sr_cr": build_sr([cr], demo_findings, DEMO_MANIFEST, DEVICE),
        "sr_ct": build_sr([ct[1]], findings(CT_CLASSIFIER, [0.25]), CT_CLASSIFIER, DEVICE),
        "seg_cr_binary": build_seg([cr], _maps(1), SEGMENTER, DEVICE),
        "seg_cr_fractional": build_seg([cr], _maps(1), SEGMENTER, DEVICE, fractional=True),
        "seg_cr_left_knee": build_seg([_cr(BodyPartExamined="KNEE", ImageLaterality="L")],
                                  _maps(1), SEGMENTER, DEVICE),
    "seg_cr_right_knee": build_seg([_right_knee()], _maps(1), SEGMENTER, DEVICE),
        "seg_ct": build_seg(ct, _maps(3), SEGMENTER, DEVICE),
        "seg_ct_3d": build_seg([volume], maps_3d, manifest_3d, DEVICE),
        "control_old_sr": _old_sr_encoding(cr),
        "control_broken_seg": broken,
    }


VALIDATED = ("sr_cr", "sr_ct", "seg_cr_binary", "seg_cr_fractional", "seg_cr_left_knee",
             "seg_cr_right_knee", "seg_ct", "seg_ct_3d")


@dataclasses.dataclass(frozen=True)
class Written:
    ds: Dataset
    path: Path


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Written]:
    folder = tmp_path_factory.mktemp("air")
    out = {}
    for name, ds in _objects().items():
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[name] = Written(ds, path)
    return out


@pytest.fixture(scope="module")
def pixelmed_reports(written: dict[str, Written]) -> dict[str, list[str]]:
    """PixelMed's report of every object, one JVM for all (skips, saying why, only where Java
    or PixelMed is missing; scripts/dev.sh installs both)."""
    reports = validators.pixelmed([w.path for w in written.values()])
    return {name: reports[w.path] for name, w in written.items()}


# ----- the validators -----


@pytest.mark.parametrize("name", VALIDATED)
def test_dciodvfy_finds_nothing_unexplained(written: dict[str, Written], name: str) -> None:
    w = written[name]
    assert validators.problems("dciodvfy", validators.dciodvfy(w.path), w.ds) == []


@pytest.mark.parametrize("name", VALIDATED)
def test_pixelmed_finds_nothing_unexplained(pixelmed_reports: dict[str, list[str]],
                                            written: dict[str, Written], name: str) -> None:
    report = pixelmed_reports[name]
    if name.startswith("sr_"):  # the IOD and the TID 1500 tree were recognised and checked
        assert {"Found ComprehensiveSR IOD", "Found Root Template TID_1500 (MeasurementReport)",
                "Root Template Validation Complete", "IOD validation complete"} <= set(report)
    else:
        assert {"Found Segmentation IOD", "IOD validation complete"} <= set(report)
    assert validators.problems("pixelmed", report, written[name].ds) == []


def test_dciodvfy_catches_what_it_should(written: dict[str, Written]) -> None:
    """Negative control: the validator and the filter do fail where the object is wrong."""
    broken = written["control_broken_seg"]
    assert any("SegmentLabel" in line for line in validators.problems(
        "dciodvfy", validators.dciodvfy(broken.path), broken.ds))


def test_pixelmed_catches_what_it_should(pixelmed_reports: dict[str, list[str]],
                                         written: dict[str, Written]) -> None:
    """Negative controls: the old SR encoding (the finding PixelMed flagged in TID 1501) and a
    SEG missing a Type 1 attribute fail."""
    old = validators.problems("pixelmed", pixelmed_reports["control_old_sr"],
                              written["control_old_sr"].ds)
    assert any("CODE (lesion,99BEDSIDE,\"lesion\"): Content Item not in template" in line
               for line in old)
    assert any("SegmentLabel" in line for line in validators.problems(
        "pixelmed", pixelmed_reports["control_broken_seg"], written["control_broken_seg"].ds))


def test_allowances_hold_only_where_their_condition_does() -> None:
    """An allowed finding on an object its condition does not describe still counts."""
    seg = build_seg([_cr(BodyPartExamined="KNEE", Laterality="L")], _maps(1), SEGMENTER,
                    DEVICE)
    laterality = "Error: GeneralSeriesModule/Laterality/: : Missing conditional attribute"
    assert validators.problems("pixelmed", [laterality], seg) == [laterality]
    extra = "Warning - Attribute is not present in standard DICOM IOD - (0x0008,0x0080) LO x"
    device = ("Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI "
              "Device UID ")
    assert validators.problems("dciodvfy", [device], seg) == []
    assert set(validators.problems("dciodvfy", [device, extra], seg)) == {device, extra}


# ----- what AIR asks of a result -----


@pytest.mark.parametrize("kind", ["SR", "SEG"])
def test_contributing_equipment_names_the_processing_algorithm(kind: str) -> None:
    manifest = dataclasses.replace(DEMO_MANIFEST if kind == "SR" else SEGMENTER,
                                   manufacturer="Acme Models", version=3)
    source = _cr()
    ds = (build_sr([source], findings(manifest, [0.6]), manifest, DEVICE) if kind == "SR"
          else build_seg([source], _maps(1), manifest, DEVICE))
    items = ds.ContributingEquipmentSequence
    purposes = [(i.PurposeOfReferenceCodeSequence[0].CodeValue,
                 i.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator) for i in items]
    # the source's acquisition equipment, the model, the library that wrote the object
    assert purposes == [("109101", "DCM"), ("1630", "99IHE"), ("109102", "DCM")]
    algorithm = _algorithm_item(ds)
    assert algorithm.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    assert (algorithm.Manufacturer, algorithm.ManufacturerModelName,
            algorithm.SoftwareVersions) == ("Acme Models", manifest.name, "3")
    assert algorithm.DeviceUID == algorithm_device_uid(manifest, DEVICE)
    assert items[2].ManufacturerModelName == "highdicom"  # the library stays named too
    assert "99IHE" in {i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence}
    # Without a manufacturer in the manifest, the gateway's configured one stands in.
    plain = dataclasses.replace(manifest, manufacturer="")
    again = (build_sr([source], findings(plain, [0.6]), plain, DEVICE) if kind == "SR"
             else build_seg([source], _maps(1), plain, DEVICE))
    assert _algorithm_item(again).Manufacturer == "Acme Hospital AI"


def test_device_uid_changes_with_the_model_version_and_only_with_the_model() -> None:
    v1 = DEMO_MANIFEST
    v2 = dataclasses.replace(DEMO_MANIFEST, version=2)
    uid = algorithm_device_uid(v1, DEVICE)
    assert uid == algorithm_device_uid(dataclasses.replace(v1), DEVICE)
    assert algorithm_device_uid(v2, DEVICE) != uid
    assert algorithm_device_uid(dataclasses.replace(v1, name="other"), DEVICE) != uid
    assert algorithm_device_uid(dataclasses.replace(v1, manufacturer="Acme Models"),
                                DEVICE) != uid
    # The gateway's serial number or device name is not the model: same UID.
    assert algorithm_device_uid(v1, dataclasses.replace(DEVICE, serial_number="9",
                                                        device_name="Other")) == uid
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    sr1 = build_sr([_cr()], findings(v1, [0.6]), v1, DEVICE)
    sr2 = build_sr([_cr()], findings(v2, [0.6]), v2, DEVICE)
    assert _algorithm_item(sr1).DeviceUID == uid
    assert _algorithm_item(sr2).DeviceUID == algorithm_device_uid(v2, DEVICE)


def test_derived_uids_and_numbers_are_the_same_in_a_new_process() -> None:
    """Nothing stored: a restarted gateway (a new process) derives the same device UID and the
    same series for a study, so results after a restart join the series before it."""
    code = ("import json, sys\n"
            "from optimizer.contract.manifest import Manifest\n"
            "from services.gateway.delivery.dicom_results import ResultDevice, "
            "algorithm_device_uid, result_series\n"
            "m = Manifest.from_dict(json.loads(sys.argv[1]))\n"
            "print(algorithm_device_uid(m, ResultDevice()), *result_series(sys.argv[2], m, "
            "'SR'))\n")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(DEMO_MANIFEST.to_dict()),
                          STUDY], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         check=True)
    uid, series_uid, number = run.stdout.split()
    assert uid == algorithm_device_uid(DEMO_MANIFEST, ResultDevice())
    assert (series_uid, int(number)) == result_series(STUDY, DEMO_MANIFEST, "SR")


def _study(study_uid: str, n: int) -> list[Dataset]:
    out = []
    series = generate_uid()
    for k in range(n):
        ds = make_instance(k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study_uid, series, k + 1
        out.append(ds)
    return out


@pytest.fixture()
def delivery(tmp_path: Path) -> Iterator[DeliveryService]:
    config = RoutesConfig(
        destinations={"pacs": DimseDestination(name="pacs", host="127.0.0.1", port=104,
                                               called_aet="PACS")},
        routes=(Route(name="all", default=True, destinations=("pacs",)),))
    service = DeliveryService(config, tmp_path / "spool", DEMO_MANIFEST, GatewayMetrics(),
                              senders={"pacs": RecordingSender("pacs")})
    yield service
    service.stop()


def _delivered(service: DeliveryService) -> list[Dataset]:
    return [pydicom.dcmread(service.outbox.folder / row.folder / name)
            for row in service.outbox.rows() for name in row.files]


def test_two_instance_study_shares_one_series_with_its_own_number_with_fake_destination(
        delivery: DeliveryService, tmp_path: Path) -> None:
    """Each instance its own group (grouping level "instance"), as when the two SR series
    numbered 9901 appeared: both SRs now land in one series, numbered for the study, model
    and kind, each SR numbered after its source instance."""
    first, second = _study(STUDY, 2)
    other = _study(OTHER_STUDY, 1)[0]
    for k, ds in enumerate((first, second, other)):
        delivery.accept(make_group(tmp_path / f"g{k}", [ds], manifest=DEMO_MANIFEST,
                                   level="instance"))
    srs = _delivered(delivery)
    assert len(srs) == 3
    ours = [sr for sr in srs if sr.StudyInstanceUID == STUDY]
    uid, number = result_series(STUDY, DEMO_MANIFEST, "SR")
    assert {(sr.SeriesInstanceUID, sr.SeriesNumber) for sr in ours} == {(uid, number)}
    assert sorted(sr.InstanceNumber for sr in ours) == [1, 2]
    assert len({sr.SOPInstanceUID for sr in ours}) == 2
    assert SERIES_NUMBER_BASE <= number < SERIES_NUMBER_BASE + SERIES_NUMBER_SPAN
    assert number not in (first.SeriesNumber, 9901)
    (theirs,) = [sr for sr in srs if sr.StudyInstanceUID == OTHER_STUDY]
    assert theirs.SeriesInstanceUID != uid


def test_series_differ_by_kind_model_and_version_within_a_study() -> None:
    keys = [(DEMO_MANIFEST, "SR"), (DEMO_MANIFEST, "SEG"), (CT_CLASSIFIER, "SR"),
            (dataclasses.replace(DEMO_MANIFEST, version=2), "SR"), (SEGMENTER, "SEG")]
    series = [result_series(STUDY, m, kind) for m, kind in keys]  # type: ignore[arg-type]
    assert len({uid for uid, _ in series}) == len(keys)
    assert len({number for _, number in series}) == len(keys)  # distinct for these inputs
    seg = build_seg(_study(STUDY, 1), _maps(1), SEGMENTER, DEVICE)
    assert (seg.SeriesInstanceUID, seg.SeriesNumber) == result_series(STUDY, SEGMENTER, "SEG")


# ----- the SR's encoding -----


def test_sr_findings_follow_tid_1501_and_evaluations_tid_1500(
        written: dict[str, Written]) -> None:
    sr = hd.sr.srread(written["sr_cr"].path)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type == label_code("lesion", 0)
    assert group.get_measurements()[0].value == pytest.approx(0.75)
    assert group.get_qualitative_evaluations() == []  # nothing outside TID 1501's rows
    (container,) = [item for item in sr.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue
                    == QUALITATIVE_EVALUATIONS.value]
    (evaluation,) = container.ContentSequence
    assert (evaluation.ValueType, evaluation.RelationshipType) == ("CODE", "CONTAINS")
    assert evaluation.ConceptNameCodeSequence[0].CodeMeaning == "lesion"
    assert evaluation.ConceptCodeSequence[0].CodeValue == codes.SCT.Present.value
    ct_sr = written["sr_ct"].ds
    (ct_container,) = [item for item in ct_sr.ContentSequence
                       if item.ConceptNameCodeSequence[0].CodeValue
                       == QUALITATIVE_EVALUATIONS.value]
    assert ct_container.ContentSequence[0].ConceptCodeSequence[0].CodeValue \
        == codes.SCT.Absent.value  # 0.25 < 0.5


# ----- the SEG's anatomy -----


def test_seg_carries_the_sources_body_part_and_laterality() -> None:
    knee = build_seg([_cr(BodyPartExamined="KNEE", Laterality="L", ImageLaterality="L")],
                     _maps(1), SEGMENTER, DEVICE)
    assert (knee.BodyPartExamined, knee.ImageLaterality) == ("KNEE", "L")
    assert "Laterality" not in knee  # Type 2C: must be absent beside Image Laterality
    series_only = build_seg([_right_knee()], _maps(1), SEGMENTER, DEVICE)
    assert (series_only.ImageLaterality, "Laterality" in series_only) == ("R", False)
    chest = _cr(BodyPartExamined="CHEST", ImageLaterality="U")
    assert "Laterality" not in chest
    seg = build_seg([chest], _maps(1), SEGMENTER, DEVICE)
    assert (seg.BodyPartExamined, seg.ImageLaterality) == ("CHEST", "U")
    assert "Laterality" not in seg
    ct = _ct_series(3)
    for ds in ct:
        ds.BodyPartExamined = "CHEST"
    ct_seg = build_seg(ct, _maps(3), SEGMENTER, DEVICE)
    assert ct_seg.BodyPartExamined == "CHEST"
    assert "Laterality" not in ct_seg and "ImageLaterality" not in ct_seg  # none invented
    mixed = copy.deepcopy(ct)
    mixed[2].BodyPartExamined = "ABDOMEN"
    assert "BodyPartExamined" not in build_seg(mixed, _maps(3), SEGMENTER, DEVICE)


def test_seg_of_an_enhanced_source_takes_its_frame_laterality() -> None:
    volume, manifest = _enhanced_ct()
    anatomy = Dataset()
    anatomy.FrameLaterality = "R"
    volume.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    maps = np.zeros((1, 2, 8, 32, 32), np.float32)
    seg = build_seg([volume], maps, manifest, DEVICE)
    assert seg.ImageLaterality == "R"
