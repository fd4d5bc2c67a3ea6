"""The job table and the crash-recovery paths of the worker (fake Triton, unit level).

Each "crash" is simulated by leaving the spool, result store and table exactly as a process
killed between two durable steps would, then starting a fresh worker on the same folder. The
tests taking ``job_db`` run against both backends: SQLite beside the spool and a real
PostgreSQL (tests/postgres.py)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from services.errors import ConfigError
from services.gateway.config import DbTarget, GatewayConfig
from services.gateway.inference.core import InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import uid_hash
from services.gateway.processing.worker import SpoolWorker
from services.gateway.store.jobs import (
    DELIVERED,
    FAILED,
    INFERRED,
    OPEN,
    RECEIVED,
    SKIPPED,
    JobTable,
)
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import base_url, fake_gateway, model_repository, wait_for
from tests.gateway.util import dicom_bytes, make_instance


def _worker(tmp: Path, fake: FakeInferer, db: DbTarget | None = None) -> SpoolWorker:
    return SpoolWorker(InferenceCore(TINY_MANIFEST, fake), Spool(tmp), ResultStore(tmp),
                       GatewayMetrics(), backoff_s=0.01, jobs=JobTable(tmp, db))


def _acked(tmp: Path, seed: int = 0, db: DbTarget | None = None) -> tuple[str, str, str]:
    """An instance spooled and recorded as the ingest path does; (job name, study, sop)."""
    ds = make_instance(seed)
    path = Spool(tmp).put(dicom_bytes(ds))
    table = JobTable(tmp, db)
    table.insert(path.name, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                 "dimse")
    table.close()
    return path.name, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def _run_until_idle(worker: SpoolWorker) -> None:
    worker.start()
    try:
        assert wait_for(lambda: worker.depth == 0)
    finally:
        worker.stop()


def test_table_is_wal_and_holds_hashed_uids_only(tmp_path: Path) -> None:
    name, study, sop = _acked(tmp_path)
    db = sqlite3.connect(tmp_path / JobTable.FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = db.execute("SELECT study_hash, sop_hash, state FROM jobs").fetchone()
    db.close()
    assert row == (uid_hash(study), uid_hash(sop), RECEIVED)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob(JobTable.FILE + "*"))
    assert study.encode() not in raw and sop.encode() not in raw
    assert name.encode() in raw  # the table really was read: the job name is there


def test_finish_happens_once(tmp_path: Path, job_db: DbTarget) -> None:
    table = JobTable(tmp_path, job_db)
    table.insert("a.dcm", "1.2.3", "1.2.3.4", "1.2.3.4.5", "rest")
    assert table.finish("a.dcm", INFERRED)
    assert not table.finish("a.dcm", FAILED)  # already final: no second transition
    assert not table.finish("unknown.dcm", INFERRED)
    row = table.get("a.dcm")
    assert row is not None and row.state == INFERRED
    with pytest.raises(ValueError):
        table.finish("a.dcm", RECEIVED)


def test_acknowledged_work_is_inferred_once_with_attempts_counted_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    name, study, _ = _acked(tmp_path, db=job_db)
    fake = FakeInferer(unavailable_calls=2)
    worker = _worker(tmp_path, fake, job_db)
    _run_until_idle(worker)
    row = worker.jobs.get(name)
    assert row is not None and (row.state, row.attempts) == (INFERRED, 3)
    assert fake.calls == 3 and len(ResultStore(tmp_path).for_study(study)) == 1
    assert "_job" not in ResultStore(tmp_path).for_study(study)[0]  # internal key stays inside
    assert Spool(tmp_path).pending() == []


def test_crash_after_result_write_is_not_inferred_again_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    name, study, sop = _acked(tmp_path, db=job_db)
    ResultStore(tmp_path).save(study, sop, {"study_instance_uid": study,
                                            "sop_instance_uid": sop, "findings": []}, job=name)
    fake = FakeInferer()
    worker = _worker(tmp_path, fake, job_db)
    _run_until_idle(worker)
    assert fake.calls == 0
    row = worker.jobs.get(name)
    assert row is not None and row.state == INFERRED and row.attempts == 0
    assert Spool(tmp_path).pending() == []


def test_crash_after_finish_only_removes_the_spool_file_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    name, _, _ = _acked(tmp_path, db=job_db)
    table = JobTable(tmp_path, job_db)
    table.finish(name, INFERRED)
    table.close()
    fake = FakeInferer()
    _run_until_idle(_worker(tmp_path, fake, job_db))
    assert fake.calls == 0 and Spool(tmp_path).pending() == []


def test_spool_file_without_row_is_reconciled_and_inferred_once_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    ds = make_instance(3)
    path = Spool(tmp_path).put(dicom_bytes(ds))  # crash before the row insert
    fake = FakeInferer()
    worker = _worker(tmp_path, fake, job_db)
    _run_until_idle(worker)
    row = worker.jobs.get(path.name)
    assert row is not None and (row.state, row.protocol, row.attempts) == (
        INFERRED, "recovered", 1)
    assert row.sop_hash == uid_hash(ds.SOPInstanceUID) and fake.calls == 1


def test_row_whose_spool_file_vanished_is_failed_not_pending(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    name, study, _ = _acked(tmp_path, db=job_db)
    (Spool(tmp_path).incoming / name).unlink()
    worker = _worker(tmp_path, FakeInferer(), job_db)
    _run_until_idle(worker)
    row = worker.jobs.get(name)
    assert row is not None and (row.state, row.error) == (FAILED, "spool_missing")
    assert worker.jobs.pending(study) == 0


def test_resent_instance_is_inferred_again_with_fake_triton(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    name, study, sop = _acked(tmp_path, db=job_db)
    ResultStore(tmp_path).save(study, sop, {"study_instance_uid": study,
                                            "sop_instance_uid": sop}, job="earlier.dcm")
    fake = FakeInferer()
    worker = _worker(tmp_path, fake, job_db)
    _run_until_idle(worker)
    assert fake.calls == 1
    assert ResultStore(tmp_path).stored(uid_hash(study), uid_hash(sop))["_job"] == name  # type: ignore[index]


def test_unreadable_spool_file_is_quarantined_and_failed(tmp_path: Path, job_db: DbTarget) -> None:
    path = Spool(tmp_path).put(b"not dicom at all")
    worker = _worker(tmp_path, FakeInferer(), job_db)
    _run_until_idle(worker)
    row = worker.jobs.get(path.name)
    assert row is not None and row.state == FAILED and row.error
    assert (Spool(tmp_path).failed / path.name).exists()


def test_disk_watermark_refuses_new_work_on_every_edge_with_fake_triton(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    gw = fake_gateway(tmp_path, min_free_bytes=free + 2**40)  # more than the disk has
    try:
        ae = AE(ae_title="SCU")
        ae.requested_contexts = StoragePresentationContexts[:20]
        assoc = ae.associate("127.0.0.1", gw.config.dicom_port, ae_title="BEDSIDE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(make_instance(1))
            assert status.Status == 0xA700
        finally:
            assoc.release()
        r = httpx.post(f"{base_url(gw)}/v1/studies", json={"instances": ["AAAA"]})
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.json()["error"]["reason"] == "disk_full"
        body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + dicom_bytes(make_instance(2))
                + b"\r\n--b--\r\n")
        r = httpx.post(f"{base_url(gw)}/dicomweb/studies", content=body, headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert Spool(gw.config.spool_dir).pending() == []  # nothing written
        metrics = httpx.get(f"{base_url(gw)}/metrics").text
        for protocol in ("dimse", "rest", "stow"):
            assert (f'bedside_gateway_requests_total{{outcome="refused",protocol="{protocol}",'
                    f'reason="disk_full"}} 1.0') in metrics
    finally:
        gw.stop()


def test_disk_watermark_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_free_bytes"):
        GatewayConfig(model_repository=model_repository(tmp_path), model_name=TINY_MANIFEST.name,
                      triton_grpc_url="x:1", spool_dir=tmp_path / "s", min_free_bytes=-1)


def test_study_status_comes_from_the_table_across_restart_with_fake_triton(
    tmp_path: Path,
) -> None:
    fake = FakeInferer(unavailable_calls=10**6)  # Triton down: stays pending
    gw = fake_gateway(tmp_path, fake)
    ds = make_instance(4)
    try:
        gw.ingestor.accept(dicom_bytes(ds), ds, "rest", 0.0, 0.0)
        r = httpx.get(f"{base_url(gw)}/v1/studies/{ds.StudyInstanceUID}/results")
        assert r.json()["status"] == "pending" and r.json()["pending"] == 1
    finally:
        gw.stop()
    gw = fake_gateway(tmp_path)  # Triton back
    try:
        assert wait_for(lambda: httpx.get(
            f"{base_url(gw)}/v1/studies/{ds.StudyInstanceUID}/results").json()["status"]
            == "done")
        assert [r.state for r in gw.worker.jobs.all()] == [INFERRED]
    finally:
        gw.stop()


_V1_SCHEMA = """
CREATE TABLE jobs (
    name TEXT PRIMARY KEY, study_hash TEXT NOT NULL, series_hash TEXT NOT NULL,
    sop_hash TEXT NOT NULL, protocol TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'inferred', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL, updated_at REAL NOT NULL,
    error TEXT);
INSERT INTO jobs VALUES ('a.dcm', 's', 'se', 'i1', 'dimse', 'received', 0, 1.0, 1.0, NULL);
INSERT INTO jobs VALUES ('b.dcm', 's', 'se', 'i2', 'rest', 'failed', 2, 1.0, 2.0, 'bad_pixels');
"""


def test_job_table_of_the_first_schema_is_migrated_with_its_rows(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / JobTable.FILE)
    db.executescript(_V1_SCHEMA)
    db.close()
    table = JobTable(tmp_path)
    rows = {r.name: r for r in table.all()}
    assert (rows["a.dcm"].state, rows["b.dcm"].state, rows["b.dcm"].error) == (
        RECEIVED, FAILED, "bad_pixels")
    assert rows["a.dcm"].group_key is None and rows["b.dcm"].attempts == 2
    assert table.finish("a.dcm", SKIPPED, "not_selected_modality")  # new states are allowed
    table.mark_delivered(["b.dcm"])
    table.close()
    again = JobTable(tmp_path)  # opening the migrated table again changes nothing
    assert [(r.name, r.state) for r in again.all()] == [("a.dcm", SKIPPED), ("b.dcm", DELIVERED)]


_V2_UNVERSIONED = """
CREATE TABLE jobs (
    name TEXT PRIMARY KEY, study_hash TEXT NOT NULL, series_hash TEXT NOT NULL,
    sop_hash TEXT NOT NULL, protocol TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN
        ('received', 'inferred', 'failed', 'skipped', 'delivered')),
    attempts INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL, updated_at REAL NOT NULL,
    error TEXT, group_key TEXT, calling_aet TEXT);
CREATE INDEX jobs_study ON jobs (study_hash, state);
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_group ON jobs (group_key);
CREATE TABLE groups (
    key TEXT PRIMARY KEY, level TEXT NOT NULL, study_hash TEXT NOT NULL,
    series_hash TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    opened_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX groups_state ON groups (state);
INSERT INTO groups VALUES ('g1', 'series', 's', 'se', 'open', 1.0, 1.0);
INSERT INTO jobs VALUES ('a.dcm', 's', 'se', 'i1', 'dimse', 'received', 0, 1.0, 1.0, NULL,
                         'g1', 'MOD1');
"""


def test_grouping_table_from_before_versioning_is_migrated_with_its_open_group(
    tmp_path: Path,
) -> None:
    """The file the gateway wrote before the schema was versioned (grouping, one worker)."""
    db = sqlite3.connect(tmp_path / JobTable.FILE)
    db.executescript(_V2_UNVERSIONED)
    db.close()
    table = JobTable(tmp_path)
    with table.db.tx() as tx:
        assert tx.execute("SELECT version FROM schema_version")[0] == [(3,)]
    [group] = table.groups(OPEN)
    assert group.key == "g1" and [m.name for m in table.members("g1")] == ["a.dcm"]
    row = table.get("a.dcm")
    assert row is not None and (row.state, row.calling_aet, row.owner) == (
        RECEIVED, "MOD1", None)
    # the migrated table keys groups for every worker: a.dcm's series joins g1
    table.insert("b.dcm", "x", "x", "x", "dimse")
    assert table.join_groups([("k2", "series", "s", "se", "b.dcm")]) == {"b.dcm": "g1"}
    table.close()


def test_mark_delivered_moves_only_inferred_or_failed_rows_once(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    table = JobTable(tmp_path, job_db)
    for name in ("a", "b", "c", "d"):
        table.insert(name, "1.2", "1.2.3", f"1.2.3.{name}", "dimse", "MODALITY")
    table.finish("a", INFERRED)
    table.finish("b", FAILED, "bad_pixels")
    table.finish("c", SKIPPED, "not_selected_modality")
    table.mark_delivered(["a", "b", "c", "d", "unknown"])
    table.mark_delivered(["a"])  # idempotent
    states = {r.name: (r.state, r.error, r.calling_aet) for r in table.all()}
    assert states == {"a": (DELIVERED, None, "MODALITY"),
                      "b": (DELIVERED, "bad_pixels", "MODALITY"),
                      "c": (SKIPPED, "not_selected_modality", "MODALITY"),
                      "d": (RECEIVED, None, "MODALITY")}
    assert table.count(DELIVERED) == 2


def test_prune_deletes_old_final_rows_but_keeps_pending_open_and_kept_ones(
    tmp_path: Path, job_db: DbTarget,
) -> None:
    table = JobTable(tmp_path, job_db)
    for name in ("old", "kept", "grouped", "fresh", "waiting"):
        table.insert(name, "1.2", "1.2.3", f"1.2.3.{name}", "rest")
    for name in ("old", "kept", "grouped"):
        table.finish(name, INFERRED)
    table.open_group("g1", "series", "h", "hs", ["grouped"])
    with table.db.tx() as tx:  # either backend: the rows grew old
        tx.execute("UPDATE jobs SET updated_at = 0 WHERE name != 'fresh'")
    table.finish("fresh", INFERRED)
    assert table.prune(3600, keep={"kept"}) == 1  # "old" only
    assert sorted(r.name for r in table.all()) == ["fresh", "grouped", "kept", "waiting"]
    table.close_group("g1")  # closed now, but just updated: kept for the retention
    assert table.prune(3600) == 2 and sorted(r.name for r in table.all()) == ["fresh", "waiting"]
