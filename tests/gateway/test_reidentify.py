"""The de-identification return path: an object that comes back about a study a route
de-identified (an external reader's SR, a vendor's SEG, built here with highdicom from the
de-identified instances exactly as a reader would) is recognised through the durable reverse
map, re-identified (every reference mapped back, the original patient and study restored) and
queued for the identified route's destinations; what the map does not know stays refused as
before. Destinations and Triton are faked (tests whose name says so); the real round trip with
two Orthanc servers is tests/integration/test_reidentify_orthanc.py."""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from services.gateway.delivery.dicom_results import build_seg, build_sr
from services.gateway.delivery.outbox import PENDING
from services.gateway.delivery.routing import DimseDestination, Retry, Route, RoutesConfig
from services.gateway.delivery.service import DeliveryService
from services.gateway.errors import UnsupportedInstance
from services.gateway.metrics import GatewayMetrics
from services.gateway.security.deid import (
    IDENTITY,
    AmbiguousReturn,
    Deidentifier,
    UidMap,
)
from tests.gateway.groups import CLASSIFIER, PHI, SEGMENTER, RecordingSender, findings
from tests.gateway.groups import study_with_phi as _study_with_phi
from tests.gateway.harness import fake_gateway, wait_for
from tests.gateway.util import dicom_bytes, make_instance

SECRET = b"reidentify-test-secret-0123456789"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
RETRY = Retry(base_s=60.0, cap_s=60.0, max_attempts=5, max_age_s=0)
# Identifying values of the source study that the returning object must get back.
EXTRA = {"PatientSex": "O", "StudyID": "STUDY-4242", "IssuerOfPatientID": "ISSUER-Q",
         "StudyDate": "20240102", "StudyTime": "101010"}


def study_with_phi(n: int, seed: int = 0) -> list[Dataset]:
    study = _study_with_phi(n, seed)
    for ds in study:
        for keyword, value in EXTRA.items():
            setattr(ds, keyword, value)
        ds.FrameOfReferenceUID = study[0].get("FrameOfReferenceUID") or "1.2.826.0.1.3680043.99.3"
    return study


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def uids(tmp_path: Path) -> Iterator[UidMap]:
    m = UidMap(tmp_path / "deid_uids.sqlite3", SECRET)
    yield m
    m.close()


def _all_uids(ds: Dataset) -> set[str]:
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            found |= {str(v) for v in (elem.value if elem.VM > 1 else [elem.value])}
    return found


def _reader_sr(deidentified: list[Dataset], study_uid: str | None = None) -> Dataset:
    """An external reader's Comprehensive SR about the de-identified instances (highdicom:
    CurrentRequestedProcedureEvidenceSequence, source image references in the content)."""
    sr = build_sr(deidentified, findings(CLASSIFIER, [0.9, 0.1]), CLASSIFIER)
    if study_uid is not None:
        sr.StudyInstanceUID = study_uid
    return pydicom.dcmread(io.BytesIO(dicom_bytes(sr)))


def reader_sr(about: Dataset, text: str = "no acute finding") -> Dataset:
    """A plain Comprehensive SR an external reader writes about ``about`` (an object of the
    de-identified study, e.g. the de-identified result it received): in that study, with its
    own new series and instance, the patient as the reader saw it (empty), and ``about`` in
    its CurrentRequestedProcedureEvidenceSequence."""
    sr = Dataset()
    sr.SOPClassUID = SR_CLASS
    sr.SOPInstanceUID, sr.SeriesInstanceUID = generate_uid(), generate_uid()
    sr.StudyInstanceUID = about.StudyInstanceUID
    sr.Modality, sr.SeriesNumber, sr.InstanceNumber = "SR", 77, 1
    sr.PatientName, sr.PatientID = about.get("PatientName", ""), about.get("PatientID", "")
    sr.PatientBirthDate, sr.PatientSex = "", ""
    sr.StudyDate, sr.StudyTime, sr.AccessionNumber = "", "", ""
    sr.ReferringPhysicianName, sr.StudyID = "", ""
    sr.Manufacturer, sr.ContentDate, sr.ContentTime = "Reader", "20260101", "120000"
    sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    sr.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "18748-4", "LN"
    title.CodeMeaning = "Diagnostic Imaging Report"
    sr.ConceptNameCodeSequence = Sequence([title])
    finding = Dataset()
    finding.RelationshipType, finding.ValueType, finding.TextValue = "CONTAINS", "TEXT", text
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    finding.ConceptNameCodeSequence = Sequence([name])
    sr.ContentSequence = Sequence([finding])
    instance = Dataset()
    instance.ReferencedSOPClassUID = about.SOPClassUID
    instance.ReferencedSOPInstanceUID = about.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = about.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([instance])
    study = Dataset()
    study.StudyInstanceUID = about.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence([series])
    sr.CurrentRequestedProcedureEvidenceSequence = Sequence([study])
    sr.PatientIdentityRemoved = "YES"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return pydicom.dcmread(io.BytesIO(dicom_bytes(sr)))


def _replacement(uid: str) -> str:
    """What de-identification makes of ``uid`` under SECRET (HMAC, as UidMap derives it)."""
    digest = hmac.new(SECRET, uid.encode("ascii"), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _assert_reidentified(back: Dataset, sources: list[Dataset]) -> None:
    source = sources[0]
    assert back.StudyInstanceUID == source.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                    "ReferringPhysicianName", *EXTRA):
        assert str(back.get(keyword)) == str(source.get(keyword)), keyword
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod",
                    "DeidentificationMethodCodeSequence"):
        assert keyword not in back
    replacements = {_replacement(u) for ds in sources for u in _all_uids(ds)
                    if not u.startswith("1.2.840.10008.")}
    assert not _all_uids(back) & replacements, "a replacement UID was left in"


def test_returning_sr_is_reidentified_into_the_original_study(uids: UidMap) -> None:
    sources = study_with_phi(2, seed=10)
    deid = Deidentifier(uids)
    sent = [deid.deidentify(ds) for ds in sources]
    sr = _reader_sr(sent)
    assert sr.StudyInstanceUID == sent[0].StudyInstanceUID  # about the de-identified study

    back = deid.reidentify_returning(sr)
    assert back is not None
    _assert_reidentified(back, sources)
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sources[0].StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence} == \
        {ds.SOPInstanceUID for ds in sources}
    # the reader's own new series and instance are kept; file meta follows the instance
    assert (back.SOPInstanceUID, back.SeriesInstanceUID) == (sr.SOPInstanceUID,
                                                             sr.SeriesInstanceUID)
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    # image references inside the SR content tree (TID 1501 source images) map back too
    refs = {e.value for e in back.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert refs == {ds.SOPInstanceUID for ds in sources}
    assert sr.PatientID == ""  # the returning object itself is not changed


def test_returning_seg_with_series_and_source_image_references_is_reidentified(
        uids: UidMap) -> None:
    sources = study_with_phi(1, seed=20)
    deid = Deidentifier(uids)
    sent = [deid.deidentify(ds) for ds in sources]
    maps = np.random.default_rng(0).random((1, 2, 32, 32)).astype(np.float32)
    seg = build_seg(sent, maps, SEGMENTER)
    seg = pydicom.dcmread(io.BytesIO(dicom_bytes(seg)))
    assert "SourceImageSequence" in {e.keyword for e in seg.iterall()}

    back = deid.reidentify_returning(seg)
    assert back is not None
    _assert_reidentified(back, sources)
    referenced = back.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        sources[0].SOPInstanceUID
    source_images = [e.value for e in back.iterall() if e.keyword == "SourceImageSequence"]
    assert source_images and all(item.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
                                 for seq in source_images for item in seq)
    if "FrameOfReferenceUID" in back:
        assert back.FrameOfReferenceUID == sources[0].FrameOfReferenceUID


def test_object_in_a_new_study_referencing_deidentified_images_goes_to_the_original(
        uids: UidMap) -> None:
    """A vendor that files its result in a study of its own: found by its references
    (SourceImageSequence, ReferencedSeriesSequence), delivered into the original study."""
    sources = study_with_phi(2, seed=30)
    deid = Deidentifier(uids)
    sent = [deid.deidentify(ds) for ds in sources]
    result = make_instance(99)
    result.StudyInstanceUID = generate_uid()  # not in the map
    result.PatientName, result.PatientID = "ANONYMOUS", "RESEARCH-17"
    source = Dataset()
    source.ReferencedSOPClassUID = sent[1].SOPClassUID
    source.ReferencedSOPInstanceUID = sent[1].SOPInstanceUID
    result.SourceImageSequence = Sequence([source])
    series = Dataset()
    series.SeriesInstanceUID = sent[1].SeriesInstanceUID
    result.ReferencedSeriesSequence = Sequence([series])

    back = deid.reidentify_returning(result)
    assert back is not None
    _assert_reidentified(back, sources)
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[1].SOPInstanceUID
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[1].SeriesInstanceUID


def test_objects_the_map_does_not_know_are_not_returning(uids: UidMap) -> None:
    deid = Deidentifier(uids)
    deid.deidentify(study_with_phi(1, seed=40)[0])
    stranger = _reader_sr(study_with_phi(1, seed=41))  # about a study never de-identified
    assert deid.reidentify_returning(stranger) is None
    assert deid.reidentify_returning(make_instance(42)) is None


def test_references_to_two_patients_studies_are_refused_one_patients_are_not(uids: UidMap) -> None:
    deid = Deidentifier(uids)
    a = deid.deidentify(study_with_phi(1, seed=50)[0])
    b_source = study_with_phi(1, seed=51)[0]
    b_source.PatientID = "OTHER-PATIENT"
    b = deid.deidentify(b_source)
    result = make_instance(52)
    refs = []
    for ds in (a, b):
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(item)
    result.SourceImageSequence = Sequence(refs)
    with pytest.raises(AmbiguousReturn):
        deid.reidentify_returning(result)
    # two studies of one patient (a comparison with a prior): the first referenced one
    prior_source = study_with_phi(1, seed=53)[0]
    prior = deid.deidentify(prior_source)
    result.SourceImageSequence[1].ReferencedSOPInstanceUID = prior.SOPInstanceUID
    back = deid.reidentify_returning(result)
    assert back is not None and back.PatientID == PHI["PatientID"]
    assert back.StudyInstanceUID != prior_source.StudyInstanceUID
    assert back.SourceImageSequence[1].ReferencedSOPInstanceUID == prior_source.SOPInstanceUID


def _referencing(result: Dataset, *about: Dataset) -> Dataset:
    refs = []
    for ds in about:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(item)
    result.SourceImageSequence = Sequence(refs)
    return result


def test_object_in_one_patients_study_referencing_another_patients_is_refused(
        uids: UidMap) -> None:
    """Its own study maps to patient X, but it references patient Y's de-identified
    instances: re-identified, Y's real UIDs would be filed into X's record."""
    deid = Deidentifier(uids)
    x_source = study_with_phi(1, seed=54)[0]
    x = deid.deidentify(x_source)
    y_source = study_with_phi(1, seed=55)[0]
    y_source.PatientID = "OTHER-PATIENT"
    y = deid.deidentify(y_source)
    with pytest.raises(AmbiguousReturn):
        deid.reidentify_returning(_referencing(reader_sr(x), y))
    with pytest.raises(AmbiguousReturn):
        deid.reidentify_returning(_referencing(reader_sr(x), x, y))
    # the same patient's prior study is a comparison: accepted, filed into X's own study
    prior_source = study_with_phi(1, seed=56)[0]
    prior = deid.deidentify(prior_source)
    back = deid.reidentify_returning(_referencing(reader_sr(x), prior))
    assert back is not None
    assert back.StudyInstanceUID == x_source.StudyInstanceUID
    assert back.PatientID == x_source.PatientID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == prior_source.SOPInstanceUID


def test_map_survives_a_restart_and_holds_only_the_identity_attributes(tmp_path: Path) -> None:
    path = tmp_path / "deid_uids.sqlite3"
    first = UidMap(path, SECRET)
    sources = study_with_phi(1, seed=60)
    sources[0].InstitutionName = "Saint Distinctive"
    sent = Deidentifier(first).deidentify(sources[0])
    first.close()

    again = UidMap(path, SECRET)  # a new process
    back = Deidentifier(again).reidentify_returning(_reader_sr([sent]))
    assert back is not None
    _assert_reidentified(back, sources)
    identity = again.identity(str(sources[0].StudyInstanceUID))
    assert identity is not None
    assert {int(e.tag) for e in identity} <= set(IDENTITY)
    again.close()
    with sqlite3.connect(path) as db:
        stored = " ".join(str(r) for r in db.execute("SELECT * FROM study_identity"))
    assert "Saint Distinctive" not in stored and PHI["PatientID"] in stored
    assert path.stat().st_mode & 0o077 == 0


def test_a_map_written_before_the_return_path_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the table as an earlier release wrote it
        db.execute("CREATE TABLE uid_map (replacement TEXT PRIMARY KEY, original TEXT NOT NULL)")
        db.execute("INSERT INTO uid_map VALUES ('2.25.1', '1.2.3.4')")
    uids = UidMap(path, SECRET)
    assert uids.original("2.25.1") == "1.2.3.4"
    sources = study_with_phi(1, seed=65)
    sent = Deidentifier(uids).deidentify(sources[0])
    back = Deidentifier(uids).reidentify_returning(_reader_sr([sent]))
    assert back is not None and back.PatientID == PHI["PatientID"]
    uids.close()


def test_studies_past_the_retention_no_longer_come_back(tmp_path: Path) -> None:
    clock = Clock()
    uids = UidMap(tmp_path / "m.sqlite3", SECRET, clock)
    deid = Deidentifier(uids)
    old, fresh = study_with_phi(1, seed=70), study_with_phi(1, seed=71)
    old_sent = deid.deidentify(old[0])
    clock.now += 10 * 86400
    fresh_sent = deid.deidentify(fresh[0])
    clock.now += 86400
    assert uids.prune(5 * 86400) == 1
    assert deid.reidentify_returning(_reader_sr([old_sent])) is None
    assert deid.reidentify_returning(_reader_sr([fresh_sent])) is not None
    uids.close()


def test_concurrent_deidentification_and_returns_map_back_consistently(uids: UidMap) -> None:
    deid = Deidentifier(uids)
    studies = [study_with_phi(2, seed=100 + 2 * k) for k in range(8)]
    for k, study in enumerate(studies):
        for ds in study:
            ds.PatientID = f"PID-{k}"
    errors: list[BaseException] = []
    backs: dict[int, Dataset] = {}

    def run(k: int) -> None:
        try:
            sent = [deid.deidentify(ds) for ds in studies[k]]
            back = deid.reidentify_returning(_reader_sr(sent))
            assert back is not None
            backs[k] = back
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(studies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for k, back in backs.items():
        assert back.PatientID == f"PID-{k}"
        assert back.StudyInstanceUID == studies[k][0].StudyInstanceUID
    assert len(backs) == len(studies)


# -- delivery: the return path queues for reidentify routes only -----------------------------

def _routes() -> RoutesConfig:
    return RoutesConfig(
        destinations={
            "pacs": DimseDestination(name="pacs", host="127.0.0.1", port=104,
                                     called_aet="PACS", retry=RETRY),
            "research": DimseDestination(name="research", host="127.0.0.1", port=105,
                                         called_aet="RESEARCH", retry=RETRY)},
        routes=(Route(name="research", calling_aets=("CT1",), destinations=("research",),
                      deidentify=True),
                Route(name="returns", calling_aets=("READER",), destinations=("pacs",),
                      reidentify=True),
                Route(name="plain", calling_aets=("OTHER",), destinations=("pacs",))),
        deid_secret=SECRET)


def test_returning_object_is_queued_once_for_the_reidentify_route_with_fake_destination(
        tmp_path: Path) -> None:
    senders = {"pacs": RecordingSender("pacs"), "research": RecordingSender("research")}
    service = DeliveryService(_routes(), tmp_path / "spool", CLASSIFIER, GatewayMetrics(),
                              senders=senders, clock=Clock(), poll_s=0.05)
    try:
        sources = study_with_phi(2, seed=80)
        uids = UidMap(tmp_path / "spool" / "deid_uids.sqlite3", SECRET)  # the service's map
        sent = [Deidentifier(uids).deidentify(ds) for ds in sources]
        sr = _reader_sr(sent)
        # not on a reidentify route: not a returning object (intake refuses the SR as before)
        assert not service.take_returning(sr, "dimse", "OTHER")
        assert not service.take_returning(sr, "dimse", "CT1")
        assert not service.take_returning(sr, "stow", None)
        assert service.outbox.rows() == []
        # on it: queued for the PACS, once however often it is sent
        assert service.take_returning(sr, "dimse", "READER")
        assert service.take_returning(sr, "dimse", "READER")
        (row,) = service.outbox.rows()
        assert (row.destination, row.route, row.state) == ("pacs", "returns", PENDING)
        assert sr.SOPInstanceUID not in row.group_key
        queued = pydicom.dcmread(service.outbox.folder / row.folder / row.files[0])
        _assert_reidentified(queued, sources)
        assert queued.SOPInstanceUID == sr.SOPInstanceUID
        # unknown to the map: not returning, even on the reidentify route
        assert not service.take_returning(_reader_sr(study_with_phi(1, seed=81)), "dimse",
                                          "READER")
        uids.close()
    finally:
        service.stop()


def test_ambiguous_returning_object_is_an_unsupported_instance(tmp_path: Path) -> None:
    service = DeliveryService(_routes(), tmp_path / "spool", CLASSIFIER, GatewayMetrics(),
                              senders={n: RecordingSender(n) for n in ("pacs", "research")},
                              clock=Clock())
    try:
        uids = UidMap(tmp_path / "spool" / "deid_uids.sqlite3", SECRET)
        a = Deidentifier(uids).deidentify(study_with_phi(1, seed=90)[0])
        other = study_with_phi(1, seed=91)[0]
        other.PatientID = "OTHER-PATIENT"
        b = Deidentifier(uids).deidentify(other)
        result = make_instance(92)
        result.SourceImageSequence = Sequence([Dataset(), Dataset()])
        for item, ds in zip(result.SourceImageSequence, (a, b), strict=True):
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = (ds.SOPClassUID,
                                                                         ds.SOPInstanceUID)
        with pytest.raises(UnsupportedInstance) as caught:
            service.take_returning(result, "dimse", "READER")
        assert caught.value.reason == "return_ambiguous"
        uids.close()
    finally:
        service.stop()


# -- the edges: DIMSE and STOW-RS with the whole gateway (Triton faked) ----------------------

def _send(port: int, calling: str, *datasets: Dataset) -> list[int]:
    ae = AE(ae_title=calling)
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="BEDSIDE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _write_routes(tmp_path: Path) -> Path:
    secret = tmp_path / "deid.key"
    secret.write_bytes(SECRET)
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"""
deidentification: {{secret_file: {secret}, retention_days: 30}}
destinations:
  pacs: {{type: dimse, host: 127.0.0.1, port: 9, called_aet: PACS,
          retry: {{base_s: 60, cap_s: 60}}}}
  research: {{type: dimse, host: 127.0.0.1, port: 9, called_aet: RESEARCH,
              retry: {{base_s: 60, cap_s: 60}}}}
routes:
  - {{name: research, calling_aets: [CT1], destinations: [research], deidentify: true}}
  - {{name: returns, calling_aets: [READER], destinations: [pacs], reidentify: true}}
  - {{name: web-returns, protocols: [stow], destinations: [pacs], reidentify: true}}
""")
    return routes


def test_sr_coming_back_by_cstore_and_stow_is_acknowledged_and_queued_with_fake_triton(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import httpx

    caplog.set_level(logging.DEBUG)
    gw = fake_gateway(tmp_path, routes_file=_write_routes(tmp_path), group_level="instance")
    try:
        assert gw.delivery is not None
        sources = study_with_phi(2, seed=110)
        assert _send(gw.config.dicom_port, "CT1", *sources) == [0, 0]
        outbox = gw.delivery.outbox
        assert wait_for(lambda: len([r for r in outbox.rows() if r.destination == "research"])
                        == 2)
        # what went out: the de-identified SRs the research archive gets
        gone = [pydicom.dcmread(outbox.folder / r.folder / f)
                for r in outbox.rows() for f in r.files]
        assert all(ds.PatientIdentityRemoved == "YES" for ds in gone)
        deid_study = gone[0].StudyInstanceUID
        assert deid_study != sources[0].StudyInstanceUID
        # a reader's SR about the de-identified study (its references: the de-identified SRs)
        reader = reader_sr(gone[0])
        stranger = _reader_sr(study_with_phi(1, seed=111))
        assert _send(gw.config.dicom_port, "READER", reader, stranger) == [0x0000, 0x0122]
        assert _send(gw.config.dicom_port, "CT1", reader) == [0x0122]  # no reidentify route

        web = reader_sr(gone[1], "follow up")
        body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + dicom_bytes(web)
                + b"\r\n--b--\r\n")
        r = httpx.post(f"http://{gw.config.http_host}:{gw.config.http_port}/dicomweb/studies",
                       content=body, timeout=30, headers={
                           "Content-Type": 'multipart/related; type="application/dicom"; '
                                           'boundary=b'})
        assert r.status_code == 200, r.text

        returned = [r for r in outbox.rows() if r.route in ("returns", "web-returns")]
        assert sorted(r.route for r in returned) == ["returns", "web-returns"]
        for row in returned:
            back = pydicom.dcmread(outbox.folder / row.folder / row.files[0])
            assert back.StudyInstanceUID == sources[0].StudyInstanceUID
            assert (back.PatientID, str(back.PatientName)) == (PHI["PatientID"],
                                                                PHI["PatientName"])
            assert "PatientIdentityRemoved" not in back
        metrics = httpx.get(f"http://{gw.config.http_host}:{gw.config.http_port}/metrics",
                            timeout=10).text
        assert 'bedside_gateway_requests_total{outcome="returned",protocol="dimse",' \
               'reason="ok"} 1.0' in metrics
        # nothing about the returning objects was inferred
        time.sleep(0.2)
        assert gw.worker.jobs.pending(deid_study) == 0
        # no patient data, no raw UID of either side in the gateway's log (the test's own
        # HTTP client logs what it received)
        logged = "\n".join(r.getMessage() for r in caplog.records
                           if not r.name.startswith(("httpx", "httpcore")))
        for value in [*PHI.values(), sources[0].StudyInstanceUID, deid_study,
                      reader.SOPInstanceUID, web.SOPInstanceUID]:
            assert str(value) not in logged, "identifying value logged"
        assert "re-identified" in logged
    finally:
        gw.stop()


def test_routes_file_reidentify_and_retention_are_validated(tmp_path: Path) -> None:
    from services.errors import ConfigError
    from services.gateway.delivery.routing import parse_routes

    key = tmp_path / "k"
    key.write_bytes(SECRET)
    dest = {"pacs": {"type": "dimse", "host": "h", "port": 104, "called_aet": "PACS"}}

    def parse(routes: list[dict[str, object]], **deid: object) -> RoutesConfig:
        return parse_routes({"destinations": dest, "routes": routes,
                             "deidentification": {"secret_file": str(key), **deid}}, tmp_path)

    out = {"name": "out", "calling_aets": ["CT1"], "destinations": ["pacs"], "deidentify": True}
    back = {"name": "back", "calling_aets": ["READER"], "destinations": ["pacs"],
            "reidentify": True}
    config = parse([out, back], retention_days=30)
    assert [r.reidentify for r in config.routes] == [False, True]
    assert config.deid_retention_s == 30 * 86400
    assert parse([out]).deid_retention_s == 365 * 86400
    with pytest.raises(ConfigError, match="exclude each other"):
        parse([{**out, "reidentify": True}])
    with pytest.raises(ConfigError, match="no route de-identifies"):
        parse([back])
    with pytest.raises(ConfigError, match="retention_days must be > 0"):
        parse([out, back], retention_days=0)
    with pytest.raises(ConfigError, match="true or false"):
        parse([out, {**back, "reidentify": "yes"}])
