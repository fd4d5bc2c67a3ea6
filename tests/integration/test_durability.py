"""Durability with real peers: the gateway killed with SIGKILL mid-study, and the real bundled
Triton stopped and started again mid-run. Nothing faked: dcmtk's storescu sends, Triton infers.

The proof that nothing was processed twice is Triton's own statistics: the restarted Triton
counts its successful inference requests, and that count must equal the instances that still
needed inference after the crash plus the gateway's one warm-up call.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from loadtests.stack import GatewayProcess as SharedGatewayProcess
from services.gateway.config import DbTarget
from services.gateway.phi import uid_hash
from services.gateway.store.jobs import INFERRED, RECEIVED, JobTable
from tests.conftest import TINY_MANIFEST
from tests.gateway.util import make_instance
from tests.integration.peers import STORESCU, Triton

pytestmark = pytest.mark.integration
MODEL = TINY_MANIFEST.name


class GatewayProcess(SharedGatewayProcess):
    """``bedside gateway`` as a subprocess, so that it can be killed for real. One gateway
    process: the Triton request counts below include one warm-up per process
    (tests/integration/test_processes.py kills one of several)."""

    def __init__(self, repository: Path, spool: Path, triton_url: str, log: Path,
                 *extra: str) -> None:
        super().__init__(repository, MODEL, spool, triton_url, log, "--processes", "1", *extra)

    def study(self, study_uid: str) -> tuple[int, Any]:
        r = httpx.get(f"{self.url}/v1/studies/{study_uid}/results", timeout=10)
        return r.status_code, r.json()


def _write_study(folder: Path, n: int, seed: int) -> tuple[str, dict[str, str]]:
    """n instances of one new study; (study UID, file path -> SOP Instance UID)."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = {}
    for k in range(n):
        ds = make_instance(seed + k, size=64)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, k + 1
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[str(path)] = str(ds.SOPInstanceUID)
    return study, files


def _storescu(port: int, files: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [STORESCU, "-v", "-aet", "TESTSCU", "-aec", "BEDSIDE", "127.0.0.1", str(port), *files],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TCP_NODELAY="1"))


def _acknowledged(storescu_output: str) -> list[str]:
    """Files whose C-STORE got a Success response, from storescu -v's output, in order."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def _rows(spool: Path, target: DbTarget | None = None) -> list[tuple[str, str, str, int]]:
    """(name, sop_hash, state, attempts) per job, read while the gateway may be writing, from
    SQLite beside the spool or from ``target``'s PostgreSQL database."""
    if target is not None and target.url != "sqlite":
        import psycopg

        with psycopg.connect(target.url) as conn:
            try:
                return [tuple(r) for r in conn.execute(  # type: ignore[misc]
                    "SELECT name, sop_hash, state, attempts FROM jobs ORDER BY name")]
            except psycopg.errors.UndefinedTable:
                return []
    db = sqlite3.connect(f"file:{spool / JobTable.FILE}?mode=ro", uri=True, timeout=10)
    try:
        return list(db.execute("SELECT name, sop_hash, state, attempts FROM jobs ORDER BY name"))
    except sqlite3.OperationalError:  # table not created yet
        return []
    finally:
        db.close()


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_mid_study_then_restart_processes_every_acked_instance_once(
    triton: Triton, optimized: Path, tmp_path: Path, job_db: DbTarget,
) -> None:
    """On each job-table backend: SQLite beside the spool, PostgreSQL (--job-db)."""
    repository, spool, log = optimized / "repository", tmp_path / "spool", tmp_path / "gw.log"
    flags = ("--job-db", job_db.url)

    def job_rows(spool: Path) -> list[tuple[str, str, str, int]]:
        return _rows(spool, job_db)

    # 1. a first study, fully processed before anything goes wrong
    study_a, files_a = _write_study(tmp_path / "a", 4, seed=300)
    gw = GatewayProcess(repository, spool, triton.grpc_url, log, *flags)
    try:
        proc = _storescu(gw.dicom_port, list(files_a))
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and len(_acknowledged(out)) == 4, out
        _wait(lambda: gw.study(study_a)[1].get("status") == "done", 60, "study A")
        # 2. Triton goes away; a large study streams in and the gateway is killed mid-way,
        #    with some instances acknowledged and none of them inferred yet
        triton.stop()
        study_b, files_b = _write_study(tmp_path / "b", 150, seed=400)
        proc = _storescu(gw.dicom_port, list(files_b))
        # a row precedes its acknowledgement: at the kill the newest row's may not have left
        # yet, so 11 rows mean at least 10 acknowledgements sent
        _wait(lambda: sum(r[2] == RECEIVED for r in job_rows(spool)) >= 11, 60,
              "some acknowledged instances")
        gw.kill()
        out, _ = proc.communicate(timeout=60)
    finally:
        gw.kill()
    acked_b = _acknowledged(out)
    assert 10 <= len(acked_b) < len(files_b), f"not killed mid-study: {len(acked_b)} acked"
    assert proc.returncode != 0  # the association broke: storescu saw the kill
    spooled = [r for r in job_rows(spool) if r[2] == RECEIVED]
    assert len(spooled) >= len(acked_b)  # every ack had its row first (maybe one more)
    # What the restart must infer is every spooled file: the kill may also land between a
    # spool file's fsync and its row's insert (not acknowledged, so no row yet); recovery
    # then adds the row and that instance, too, is inferred exactly once.
    pending = list((spool / "incoming").glob("*.dcm"))
    assert len(pending) in (len(spooled), len(spooled) + 1)

    # 3. Triton back on the same ports, gateway restarted on the same spool
    triton.start()
    baseline = triton.successful_requests()  # the model's own warm-up requests, if any
    gw = GatewayProcess(repository, spool, triton.grpc_url, log, *flags)
    try:
        _wait(lambda: not any(r[2] == RECEIVED for r in job_rows(spool)), 120,
              "every acknowledged instance to finish")
        status, body = gw.study(study_b)
        assert status == 200 and body["status"] == "done"
        results_b = {r["sop_instance_uid"]: r for r in body["instances"]}
        status, body = gw.study(study_a)
        assert status == 200 and len(body["instances"]) == 4
        inferred_after_restart = triton.successful_requests()
    finally:
        gw.terminate()

    for path in acked_b:  # every acknowledged instance has exactly one, real, result
        result = results_b[files_b[path]]
        assert "error" not in result and result["findings"][0]["score"] >= 0
    rows = job_rows(spool)
    sop_hashes = [r[1] for r in rows]
    assert len(sop_hashes) == len(set(sop_hashes))  # one row per instance
    assert {uid_hash(files_b[p]) for p in acked_b} <= set(sop_hashes)
    assert {uid_hash(s) for s in files_a.values()} <= set(sop_hashes)
    assert all(r[2] == INFERRED for r in rows), rows
    assert all(r[3] == 1 for r in rows if r[1] in {uid_hash(s) for s in files_a.values()})
    assert not list((spool / "incoming").glob("*.dcm"))
    # nothing inferred twice: the restarted Triton saw each spooled instance once, plus the
    # restarted gateway's warm-up; study A (finished before the crash) was not re-inferred
    assert inferred_after_restart - baseline == len(pending) + 1, (
        inferred_after_restart, baseline, len(pending))
    stored = list((spool / "results").rglob("*.json"))
    assert len(stored) == len(rows)
    jobs = {json.loads(p.read_text())["_job"] for p in stored}
    assert jobs == {r[0] for r in rows}  # each result written by its own job, once
    text = log.read_text(errors="replace")
    assert "recovered" in text  # the restart really went through recovery
    assert not any(uid in text for uid in [study_a, study_b, *files_a.values(),
                                           *files_b.values()])  # no raw UIDs in the logs
    print(f"acknowledged before SIGKILL: {len(acked_b)} of {len(files_b)}; "
          f"spooled: {len(pending)}; Triton requests after restart: "
          f"{inferred_after_restart - baseline}")



def test_triton_stopped_and_restarted_mid_run_loses_and_fails_nothing(
    triton: Triton, optimized: Path, tmp_path: Path,
) -> None:
    repository, spool = optimized / "repository", tmp_path / "spool"
    study_a, files_a = _write_study(tmp_path / "a", 3, seed=500)
    study_b, files_b = _write_study(tmp_path / "b", 6, seed=510)
    gw = GatewayProcess(repository, spool, triton.grpc_url, tmp_path / "gw.log")
    try:
        proc = _storescu(gw.dicom_port, list(files_a))
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and len(_acknowledged(out)) == 3, out
        _wait(lambda: gw.study(study_a)[1].get("status") == "done", 60, "study A")
        triton.stop()
        # Triton is down: DIMSE still acknowledges to the spool (it has room) ...
        proc = _storescu(gw.dicom_port, list(files_b))
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and len(_acknowledged(out)) == 6, out
        # ... synchronous inference answers 503 + Retry-After, soon without even trying
        one = Path(next(iter(files_a))).read_bytes()
        reasons = []
        for _ in range(6):
            r = httpx.post(f"{gw.url}/v1/infer", content=one, timeout=30,
                           headers={"Content-Type": "application/dicom"})
            assert r.status_code == 503 and r.headers["Retry-After"], r.text
            reasons.append(r.json()["error"]["reason"])
        assert reasons[-1] == "triton_circuit_open", reasons
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'bedside_gateway_triton_breaker{state="open"} 1.0' in metrics
        assert gw.study(study_b)[1]["status"] == "pending"
        # Triton back on the same ports: everything acknowledged gets its result
        triton.start()
        _wait(lambda: gw.study(study_b)[1].get("status") == "done", 90, "study B after restart")
        status, body = gw.study(study_b)
        metrics = httpx.get(f"{gw.url}/metrics").text
    finally:
        gw.terminate()
    assert status == 200 and len(body["instances"]) == 6
    assert all("error" not in r and r["findings"] for r in body["instances"])
    assert 'bedside_gateway_triton_breaker{state="closed"} 1.0' in metrics
    assert 'bedside_gateway_jobs{state="failed"} 0.0' in metrics
    rows = _rows(spool)
    assert len(rows) == 9 and all(r[2] == INFERRED for r in rows)
    assert not list((spool / "incoming").glob("*.dcm"))
