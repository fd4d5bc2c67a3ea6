"""The audit trail: JSON lines appended (never rewritten), hashed UIDs only, syslog and
stdout targets."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from services.errors import ConfigError
from services.gateway.phi import uid_hash
from services.gateway.security import audit
from services.gateway.security.audit import AuditLog
from tests.gateway.util import dicom_bytes, make_instance


def test_records_are_appended_one_json_line_each(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    path.parent.mkdir()
    path.write_text('{"earlier": true}\n')
    log = AuditLog(path)
    log.write("request", "rest", "infer", "ok", principal="key:ris", source="10.1.2.3",
              status=200, duration_ms=1.23456)
    log.write("request", "rest", "infer", "unauthenticated", status=401,
              reason="no_credentials")
    log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"earlier": true}', "an existing trail is appended to, never truncated"
    first, second = (json.loads(line) for line in lines[1:])
    assert first["principal"] == "key:ris" and first["source"] == "10.1.2.3"
    assert (first["protocol"], first["action"], first["outcome"], first["status"]) == (
        "rest", "infer", "ok", 200)
    assert first["duration_ms"] == 1.235 and first["time"].endswith("+00:00")
    assert second["principal"] is None and second["reason"] == "no_credentials"
    fresh = tmp_path / "new.jsonl"
    AuditLog(fresh).close()
    assert fresh.stat().st_mode & 0o007 == 0, "a new trail is not readable by others"


def test_context_collects_hashed_uids_of_parsed_instances_and_never_raw_ones(
        tmp_path: Path) -> None:
    ds = make_instance(3)
    ds.PatientName = "Doe^Jane"
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    audit.note_dataset(ds)  # outside a request: nothing to record into, no error
    with audit.request_context() as uids:
        audit.note_dataset(ds)
        audit.note_dataset(ds)  # the same instance twice is listed once
        log.write("request", "stow", "stow", "ok", uids=uids)
    log.close()
    text = path.read_text()
    record = json.loads(text)
    assert record["instance"] == [uid_hash(str(ds.SOPInstanceUID))]
    assert record["study"] == [uid_hash(str(ds.StudyInstanceUID))]
    assert record["series"] == [uid_hash(str(ds.SeriesInstanceUID))]
    for raw in (str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), "Doe", str(ds.PatientID)):
        assert raw not in text


def test_syslog_target_gets_the_same_line_over_udp(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]
        log = AuditLog(None, syslog=f"127.0.0.1:{port}")
        record = log.write("association", "dimse", "associate", "rejected",
                           principal="ae:MODALITY", reason="calling_ae_not_allowed")
        data = server.recv(65536).decode()
        log.close()
    assert data.startswith("<")  # RFC 3164 priority: authpriv.info
    payload = json.loads(data.split("bedside-audit: ", 1)[1].rstrip("\x00"))
    assert payload == record


def test_stdout_target(capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog(Path("-"))
    log.write("request", "oip_grpc", "infer", "ok", principal="cert:CN=x")
    assert json.loads(capsys.readouterr().out)["principal"] == "cert:CN=x"


def test_bad_targets_are_configuration_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="audit log"):
        AuditLog(tmp_path / "file" / "audit.jsonl")
    with pytest.raises(ConfigError, match="host:port"):
        AuditLog(None, syslog="nowhere")


def test_dimse_associations_and_instances_are_audited_with_fake_triton(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.presentation import StoragePresentationContexts

    from tests.gateway.harness import fake_gateway

    trail = tmp_path / "audit.jsonl"
    gw = fake_gateway(tmp_path, allowed_calling_aets=("CT1",), audit_log=trail)
    good = make_instance(1)
    good.PatientName = "Doe^John"
    no_pixels = make_instance(2)
    del no_pixels.PixelData
    try:
        for calling in ("CT1", "INTRUDER"):
            ae = AE(ae_title=calling)
            ae.requested_contexts = StoragePresentationContexts[:40]
            assoc = ae.associate(gw.config.dicom_host, gw.config.dicom_port, ae_title="BEDSIDE")
            if calling == "CT1":
                assert assoc.is_established
                assert assoc.send_c_store(good).Status == 0
                assert assoc.send_c_store(no_pixels).Status == 0xA900
                assoc.release()
            else:
                assert assoc.is_rejected
    finally:
        gw.stop()
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    assert [(r["event"], r["principal"], r["outcome"], r["status"]) for r in records] == [
        ("association", "ae:CT1", "ok", "A-ASSOCIATE-AC"),
        ("instance", "ae:CT1", "ok", "0x0000"),
        ("instance", "ae:CT1", "refused", "0xA900"),
        ("association", "ae:INTRUDER", "calling_ae_not_allowed", "A-ASSOCIATE-RJ")]
    assert records[1]["instance"] == [uid_hash(str(good.SOPInstanceUID))]
    assert records[2]["reason"] == "no_pixel_data"
    assert all(r["protocol"] == "dimse" and r["source"] == "127.0.0.1" for r in records)
    text = trail.read_text()
    for raw in (str(good.SOPInstanceUID), str(good.StudyInstanceUID), "Doe", str(good.PatientID)):
        assert raw not in text


def test_association_size_limit_refuses_with_0xa700_and_is_audited_with_fake_triton(
        tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.presentation import StoragePresentationContexts

    from tests.gateway.harness import fake_gateway

    instances = [make_instance(k) for k in (10, 11, 12)]
    one = len(dicom_bytes(instances[0]))
    trail = tmp_path / "audit.jsonl"
    gw = fake_gateway(tmp_path, max_association_bytes=int(one * 1.5), audit_log=trail)
    try:
        statuses = []
        for batch in (instances[:2], instances[2:]):  # a new association starts afresh
            ae = AE(ae_title="CT1")
            ae.requested_contexts = StoragePresentationContexts[:40]
            assoc = ae.associate(gw.config.dicom_host, gw.config.dicom_port)
            statuses += [assoc.send_c_store(ds).Status for ds in batch]
            assoc.release()
    finally:
        gw.stop()
    assert statuses == [0x0000, 0xA700, 0x0000]
    refused = [json.loads(line) for line in trail.read_text().splitlines()
               if '"refused"' in line]
    assert [(r["reason"], r["status"]) for r in refused] == [("association_too_large", "0xA700")]
