"""PS3.15 basic-profile de-identification: every attribute of the profile's table present in
the test data gets its action; private tags go; UIDs are replaced consistently and map back;
the de-identified instance is still valid per dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from services.gateway.security.deid import ACTIONS, METHOD, Deidentifier, DeidOptions, UidMap
from tests.gateway.util import dicom_bytes, make_instance

SECRET = b"0123456789abcdef-test-secret"
# Distinctive values, so that any survivor is found by a plain substring search.
PHI = {
    "PatientName": "Zyxwvut^Quirinus", "PatientID": "PID-77713", "PatientBirthDate": "19411225",
    "PatientSex": "O", "AccessionNumber": "ACC-31337", "StudyID": "STUDY-4242",
    "ReferringPhysicianName": "Referrer^Hieronymus", "InstitutionName": "Saint Distinctive",
    "InstitutionAddress": "1 Unique Lane", "StationName": "STATION-XQ9",
    "OperatorsName": "Operator^Ottilie", "OtherPatientIDs": "OTHER-5150",
    "PatientAddress": "99 Hidden Road", "PatientAge": "083Y", "PatientWeight": "71.5",
    "StudyDescription": "CHEST Zyxwvut", "SeriesDescription": "PA Zyxwvut",
    "ImageComments": "seen by Dr Zyxwvut", "DeviceSerialNumber": "SN-000999",
    "ProtocolName": "Protocol Zyxwvut", "AcquisitionDate": "20240102",
    "AdditionalPatientHistory": "history Zyxwvut", "PatientComments": "comment Zyxwvut",
}


def _instance(seed: int, study: str | None = None) -> Dataset:
    ds = make_instance(seed)
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    if study:
        ds.StudyInstanceUID = study
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.99.7"
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.99.8"
    person = Dataset()
    person.PersonName = "Nested^Zyxwvut"
    ref.ContentSequence = Sequence([person])
    ds.ReferencedImageSequence = Sequence([ref])
    ds.add_new(0x00091001, "LO", "private Zyxwvut")  # private creator-less, still private
    ds.add_new(0x00090010, "LO", "VENDOR")
    return ds


@pytest.fixture()
def deid(tmp_path: Path) -> Deidentifier:
    return Deidentifier(UidMap(tmp_path / "uids.sqlite", SECRET))


def test_every_profile_attribute_present_gets_its_action(deid: Deidentifier) -> None:
    source = _instance(1)
    out = deid.deidentify(source)
    checked = 0
    for elem in source:
        action = ACTIONS.get(int(elem.tag))
        if action is None:
            continue
        checked += 1
        if action == "X":
            assert elem.tag not in out, elem.keyword
        elif action == "Z":
            assert elem.tag in out and not out[elem.tag].value, elem.keyword
        elif action == "U":
            assert out[elem.tag].value != elem.value and out[elem.tag].value.startswith("2.25.")
    assert checked >= 25
    nested = out.ReferencedImageSequence[0]
    assert nested.ReferencedSOPInstanceUID.startswith("2.25.")
    assert nested.ContentSequence[0].PersonName == "ANONYMOUS"  # D: dummy
    assert out.SOPClassUID == source.SOPClassUID  # a standard UID is kept
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.Rows == source.Rows and out.PixelData == source.PixelData  # image kept
    assert source.PatientName == PHI["PatientName"]  # the input is not modified


def test_nothing_identifying_survives_and_the_method_is_recorded(deid: Deidentifier) -> None:
    source = _instance(2)
    blob = dicom_bytes(deid.deidentify(source))
    for value in [*PHI.values(), source.StudyInstanceUID, source.SOPInstanceUID,
                  source.SeriesInstanceUID, "Zyxwvut", "1.2.826.0.1.3680043.99"]:
        if len(value) > 3:
            assert value.encode() not in blob, value
    out = deid.deidentify(source)
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod == METHOD
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


def test_private_tags_removed_unless_retained(tmp_path: Path) -> None:
    source = _instance(3)
    assert 0x00091001 not in Deidentifier(UidMap(tmp_path / "a", SECRET)).deidentify(source)
    keep = Deidentifier(UidMap(tmp_path / "b", SECRET), DeidOptions(retain_private=(0x00091001,)))
    assert keep.deidentify(source)[0x00091001].value == "private Zyxwvut"


def test_uids_are_consistent_across_instances_and_restarts(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.99.1"
    first = Deidentifier(UidMap(tmp_path / "uids.sqlite", SECRET))
    a, b = first.deidentify(_instance(4, study)), first.deidentify(_instance(5, study))
    assert a.StudyInstanceUID == b.StudyInstanceUID  # one study stays one study
    assert a.SOPInstanceUID != b.SOPInstanceUID
    again = Deidentifier(UidMap(tmp_path / "uids.sqlite", SECRET))  # after a restart
    assert again.deidentify(_instance(4, study)).StudyInstanceUID == a.StudyInstanceUID
    other = Deidentifier(UidMap(tmp_path / "other.sqlite", b"another-secret-of-16+"))
    assert other.deidentify(_instance(4, study)).StudyInstanceUID != a.StudyInstanceUID
    assert (tmp_path / "uids.sqlite").stat().st_mode & 0o077 == 0  # not world-readable


def test_results_are_reidentified_on_return(deid: Deidentifier) -> None:
    source = _instance(6)
    sent = deid.deidentify(source)
    # a result object made from what was sent, referencing it
    result = Dataset()
    result.StudyInstanceUID = sent.StudyInstanceUID
    result.SOPInstanceUID = "1.2.826.0.1.3680043.99.555"  # new in the result: no mapping
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = sent.SOPInstanceUID
    result.CurrentRequestedProcedureEvidenceSequence = Sequence([ref])
    result.PatientName, result.PatientID = sent.PatientName, sent.PatientID
    result.PatientIdentityRemoved = "YES"
    back = deid.reidentify(result, source)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    assert back.SOPInstanceUID == "1.2.826.0.1.3680043.99.555"
    assert (back.PatientName, back.PatientID) == (PHI["PatientName"], PHI["PatientID"])
    assert "PatientIdentityRemoved" not in back


def test_secret_must_be_long_enough(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        UidMap(tmp_path / "x", b"short")


def test_deidentified_instance_is_still_valid_per_dciodvfy(deid: Deidentifier,
                                                           tmp_path: Path) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.fail("dciodvfy not found: run scripts/dev.sh setup (installs dicom3tools)")
    path = tmp_path / "deid.dcm"
    deid.deidentify(make_instance(7)).save_as(path, enforce_file_format=True)
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60,
                         check=False)
    errors = [line for line in (out.stdout + out.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == [], out.stdout + out.stderr
