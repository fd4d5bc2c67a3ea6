"""Several gateway processes per pod, as real processes: ``bedside gateway --processes 2`` (a
supervisor and two spawned gateway processes on the same ports) and ``bedside serve
--processes 2`` with the real bundled Triton.

Which process served what is read from the log, whose lines name the process (``gateway-0``,
``gateway-1``); the kernel spreads new connections over the processes (SO_REUSEPORT), so each
check opens new connections until both processes were seen, or fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from loadtests.stack import (
    GatewayProcess,
    bedside_executable,
    wait_http_ok,
    wait_processes_ready,
)
from services.gateway.phi import uid_hash
from services.gateway.security.auth import hash_key, new_key
from services.gateway.store.jobs import JobTable
from services.gateway.store.results import ResultStore
from services.net import free_port
from tests.conftest import TINY_MANIFEST
from tests.gateway.harness import model_repository
from tests.gateway.util import make_instance
from tests.integration.peers import STORESCU

pytestmark = pytest.mark.integration
MODEL = TINY_MANIFEST.name
VERIFICATION = "1.2.840.10008.1.1"
_SERVED = re.compile(r" (gateway-\d+) services\.gateway\.security\.audit: (\{.*\})$")


def _audit(log: Path) -> list[tuple[str, dict[str, object]]]:
    """(process name, audit record) of every audit line the pod logged so far."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = _SERVED.search(line)
        if m:
            out.append((m.group(1), json.loads(m.group(2))))
    return out


def _port_free(port: int) -> bool:
    """Nothing listens on the port any more (a connection is refused)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] \
        if Path(f"/proc/{pid}/stat").exists() else "X"
    return state != "Z"


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[tuple[GatewayProcess, dict[str, str]]]:
    """Two gateway processes without Triton (DIMSE stores are spooled and acknowledged all
    the same), API keys on, a per-AE association limit of 2."""
    keys = {"ops": new_key(), "limited": new_key()}
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [
        {"name": "ops", "sha256": hash_key(keys["ops"]), "scopes": ["read", "metrics"],
         "rate_per_s": 1000, "burst": 1000},
        {"name": "limited", "sha256": hash_key(keys["limited"]), "scopes": ["read"],
         "rate_per_s": 0.01, "burst": 4},
    ]}))
    gw = GatewayProcess(model_repository(tmp_path), MODEL, tmp_path / "spool", "127.0.0.1:1",
                        tmp_path / "gw.log", "--processes", "2", "--min-free-bytes", "0",
                        "--max-associations-per-ae", "2",
                        security=("--api-keys", str(keys_file), "--plaintext"))
    try:
        # both processes up (each logs "gateway ready")
        _wait(lambda: gw.log.read_text().count("gateway ready") == 2, 60, "two processes")
        yield gw, keys
    finally:
        gw.kill()


def _store(port: int, seed: int) -> int:
    """One C-STORE on an association of its own; the response status."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="BEDSIDE")
    assert assoc.is_established
    ds = make_instance(seed, size=32)
    ds.StudyInstanceUID = generate_uid()
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def test_two_processes_serve_share_limits_and_metrics_then_drain_on_sigterm(
        pod: tuple[GatewayProcess, dict[str, str]]) -> None:
    gw, keys = pod
    t0 = time.monotonic()
    # DIMSE from both processes, every store acknowledged
    stores = 0
    while {p for p, r in _audit(gw.log) if r.get("action") == "store"} != {"gateway-0",
                                                                             "gateway-1"}:
        assert stores < 24, "the kernel sent every association to one process"
        assert _store(gw.dicom_port, stores) == 0x0000
        stores += 1
    # REST from both processes; the metrics any process answers are the pod's totals
    ops = {"x-api-key": keys["ops"]}
    scrapes: list[str] = []
    for _ in range(40):
        scrapes.append(httpx.get(f"{gw.url}/metrics", headers=ops, timeout=10).text)
        served = {p for p, r in _audit(gw.log) if r.get("action") == "metrics"}
        if served == {"gateway-0", "gateway-1"} and len(scrapes) >= 4:
            break
    assert served == {"gateway-0", "gateway-1"}
    accepted = 'bedside_gateway_requests_total{outcome="accepted",protocol="dimse",reason="ok"}'
    received = 'bedside_gateway_jobs{state="received"}'
    for text in scrapes:  # from either process: the pod's count, never one process's share
        assert f"{accepted} {float(stores)}" in text, text[-2000:]
        assert f"{received} {float(stores)}" in text
    # the rate limit is the pod's: a key with a burst of 4 gets 4 answers, whichever process
    limited = {"x-api-key": keys["limited"]}
    codes = [httpx.get(f"{gw.url}/v2", headers=limited, timeout=10).status_code
             for _ in range(12)]
    assert codes.count(200) == 4 and codes.count(429) == 8, codes
    by = {p for p, r in _audit(gw.log) if r.get("principal") == "key:limited"}
    assert by == {"gateway-0", "gateway-1"}  # both processes answered this key
    # the per-AE association limit is the pod's: 2 held, whichever process holds them
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(VERIFICATION)
    held = []
    for _ in range(8):
        assoc = ae.associate("127.0.0.1", gw.dicom_port, ae_title="BEDSIDE")
        if assoc.is_established:
            held.append(assoc)
        if {p for p, r in _audit(gw.log) if r.get("principal") == "ae:HOLDER"} == {
                "gateway-0", "gateway-1"} and len(held) == 2:
            break
    try:
        assert len(held) == 2
        refused = ae.associate("127.0.0.1", gw.dicom_port, ae_title="BEDSIDE")
        assert refused.is_rejected
        served = {p for p, r in _audit(gw.log) if r.get("principal") == "ae:HOLDER"}
        assert served == {"gateway-0", "gateway-1"}
    finally:
        for assoc in held:
            assoc.release()
    # once released, the AE may associate again (the holds were given back)
    again = [ae.associate("127.0.0.1", gw.dicom_port, ae_title="BEDSIDE") for _ in range(2)]
    assert all(a.is_established for a in again)
    for assoc in again:
        assoc.release()
    print(f"t={time.monotonic() - t0:.1f}s before SIGTERM")

    # SIGTERM to the supervisor: both processes stop their listeners and drain, exit 0
    os.kill(gw.proc.pid, signal.SIGTERM)
    assert gw.proc.wait(timeout=60) == 0
    print(f"t={time.monotonic() - t0:.1f}s drained")
    log = gw.log.read_text()
    assert "gateway-0 services.gateway.app: gateway stopped" in log
    assert "gateway-1 services.gateway.app: gateway stopped" in log
    assert _port_free(gw.http_port) and _port_free(gw.dicom_port)
    # every acknowledged instance is still in the spool for the next start
    assert len(list((gw.spool / "incoming").glob("*.dcm"))) == stores


def _ask(port: int) -> tuple[socket.socket, int | None]:
    """A new connection and one request on it, kept open: (socket, status, None: closed
    unanswered)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    try:
        head = sock.recv(4096)
    except ConnectionResetError:
        head = b""
    return sock, int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None


def _status_of_new_connection(port: int) -> int | None:
    sock, status = _ask(port)
    sock.close()
    return status


def test_the_connections_per_source_cap_is_the_pods_with_real_processes(
        tmp_path: Path) -> None:
    """Two processes, ``--max-connections-per-source 2``: two connections held from one
    address, every further one is refused, whichever process the kernel gives it to."""
    gw = GatewayProcess(model_repository(tmp_path), MODEL, tmp_path / "spool", "127.0.0.1:1",
                        tmp_path / "gw.log", "--processes", "2", "--min-free-bytes", "0",
                        "--max-connections-per-source", "2")
    held: list[socket.socket] = []
    try:
        _wait(lambda: gw.log.read_text().count("gateway ready") == 2, 60, "two processes")
        for _ in range(2):
            sock, status = _ask(gw.http_port)
            held.append(sock)
            assert status == 200
        tries = 0
        while {p for p, r in _audit(gw.log) if r.get("reason") == "source_connection_limit"
               } != {"gateway-0", "gateway-1"}:
            assert tries < 24, "the kernel sent every refused connection to one process"
            sock, status = _ask(gw.http_port)
            sock.close()
            assert status in (429, None)  # answered 429, or closed at once beyond twice the cap
            tries += 1
        for sock in held:
            sock.close()
        held = []
        # closed: the pod's holds are given back, two connections are admitted again
        _wait(lambda: _status_of_new_connection(gw.http_port) == 200, 10, "the cap to free up")
    finally:
        for sock in held:
            sock.close()
        gw.kill()


def test_killing_the_supervisor_with_sigkill_takes_every_process_with_it(
        tmp_path: Path) -> None:
    gw = GatewayProcess(model_repository(tmp_path), MODEL, tmp_path / "spool", "127.0.0.1:1",
                        tmp_path / "gw.log", "--processes", "2", "--min-free-bytes", "0")
    try:
        _wait(lambda: len(_children(gw.proc.pid)) >= 2
              and gw.log.read_text().count("gateway ready") == 2, 60, "two processes")
        children = _children(gw.proc.pid)
        os.kill(gw.proc.pid, signal.SIGKILL)  # the supervisor only, not its process group
        gw.proc.wait(timeout=10)
        _wait(lambda: not any(_alive(p) for p in children), 30, "the orphans to exit")
        assert _port_free(gw.http_port) and _port_free(gw.dicom_port)
    finally:
        gw.kill()


def _write_study(folder: Path, n: int, seed: int) -> tuple[str, dict[str, str]]:
    """n small instances of one new study; (study UID, file path -> SOP Instance UID)."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = {}
    for k in range(n):
        ds = make_instance(seed + k, size=32)
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
    """Files whose C-STORE got a Success response, from storescu -v's output."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def _rows(spool: Path) -> list[tuple[str, str, str, str, str | None]]:
    """(name, study_hash, sop_hash, state, group_key) per job, read while the pod writes."""
    db = sqlite3.connect(f"file:{spool / JobTable.FILE}?mode=ro", uri=True, timeout=10)
    try:
        return list(db.execute("SELECT name, study_hash, sop_hash, state, group_key FROM jobs"))
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()


def _pids(log: Path) -> dict[str, int]:
    """gateway-N -> its current pid, from the supervisor's "gateway-N started (pid P)"."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(
        r"(gateway-\d+) started \(pid (\d+)\)", log.read_text())}


def _serve(optimized: Path, spool: Path, log: Path, http: int, dicom: int,
           triton_grpc: int) -> subprocess.Popen[bytes]:
    """``bedside serve --processes 2`` at study level (2 s timeout, 2 s leases), ready."""
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(bedside_executable()), "serve", "--repository", str(optimized / "repository"),
             "--model", MODEL, "--spool", str(spool), "--http-port", str(http),
             "--dicom-port", str(dicom), "--grpc-port", "0", "--triton-grpc-port",
             str(triton_grpc), "--no-auth", "--plaintext", "--processes", "2",
             "--min-free-bytes", "0", "--group-level", "study", "--group-timeout", "2",
             "--job-lease", "2"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http_ok(f"http://127.0.0.1:{http}/readyz", 120, proc, log)
    wait_processes_ready(log, offset, 2, 60, proc)
    return proc


def _stream_and_kill(log: Path, spool: Path, dicom: int, files: dict[str, str], study: str,
                     kill: Callable[[str], None]) -> list[str]:
    """Send the files over two associations; once 10 are acknowledged, ``kill(process name)``
    with the name of a process the stream reaches; the files acknowledged."""
    seen = len(_audit(log))
    senders = [_storescu(dicom, list(files)[k::2]) for k in range(2)]
    _wait(lambda: sum(r[1] == uid_hash(study) for r in _rows(spool)) >= 10, 60,
          "some of the study acknowledged")
    kill(next(p for p, r in _audit(log)[seen:] if r.get("action") == "store"))
    acked = [f for p in senders for f in _acknowledged(p.communicate(timeout=120)[0])]
    assert 10 <= len(acked) < len(files), f"not killed mid-stream: {len(acked)} acked"
    return acked


def _finished(spool: Path) -> bool:
    rows = _rows(spool)
    return bool(rows) and not any(r[3] == "received" for r in rows)


def test_pod_with_triton_one_process_then_every_process_killed_mid_stream(
        optimized: Path, tmp_path: Path) -> None:
    """``bedside serve --processes 2`` at study level, real Triton, dcmtk storescu: a study
    sent over several associations reaches both processes and is one group; one process killed
    with SIGKILL mid-stream is restarted; then the whole pod (supervisor and every gateway
    process) is killed with SIGKILL mid-stream, which leaves no tritonserver behind, and a new
    pod on the same spool finishes the work: every acknowledged instance has exactly one
    result; the new pod drains on SIGTERM."""
    http, dicom, triton_grpc = free_port(), free_port(), free_port()
    spool, log = tmp_path / "spool", tmp_path / "serve.log"
    proc = _serve(optimized, spool, log, http, dicom, triton_grpc)
    try:
        # 1. one study over associations of its own, two at a time, until both processes
        #    stored some of it (the kernel picks the process of each new connection)
        study_s, files_s = _write_study(tmp_path / "s", 48, seed=500)
        chunks = [list(files_s)[k::6] for k in range(6)]
        acked_s: list[str] = []
        sent: list[str] = []
        storers: set[str] = set()
        while chunks and storers != {"gateway-0", "gateway-1"}:
            pair, chunks = chunks[:2], chunks[2:]
            for p in [_storescu(dicom, c) for c in pair]:
                acked_s += _acknowledged(p.communicate(timeout=60)[0])
            sent += [f for c in pair for f in c]
            storers = {p for p, r in _audit(log) if r.get("action") == "store"}
        assert storers == {"gateway-0", "gateway-1"}, "the study reached one process only"
        assert sorted(acked_s) == sorted(sent)
        # 2. a second study streams; one process it reaches is killed with SIGKILL
        study_t, files_t = _write_study(tmp_path / "t", 120, seed=700)
        acked_t = _stream_and_kill(log, spool, dicom, files_t, study_t,
                                   lambda name: os.kill(_pids(log)[name], signal.SIGKILL))
        _wait(lambda: log.read_text().count(" started (pid ") >= 3, 30, "the restart")
        _wait(lambda: _finished(spool), 120, "every acknowledged instance to finish")
        # 3. a third study streams; the whole pod is killed with SIGKILL (tritonserver, in a
        #    session of its own, must go with it)
        tritons = [int(p) for p in subprocess.run(
            ["pgrep", "-f", "--", f"--grpc-port={triton_grpc}"], capture_output=True, text=True,
            check=False).stdout.split()]
        assert tritons, "no tritonserver found"
        stubs = [c for t in tritons for c in _children(t)]  # its python backend stubs
        study_u, files_u = _write_study(tmp_path / "u", 120, seed=900)
        acked_u = _stream_and_kill(log, spool, dicom, files_u, study_u,
                                   lambda name: os.killpg(proc.pid, signal.SIGKILL))
        proc.wait(timeout=10)
        _wait(lambda: not any(_alive(p) for p in [*tritons, *stubs]), 30,
              "tritonserver to exit with the pod")
        _wait(lambda: _port_free(triton_grpc) and _port_free(http) and _port_free(dicom), 10,
              "the ports")
        assert any(r[3] == "received" for r in _rows(spool))  # work was left unfinished
        # 4. a new pod on the same spool finishes it; SIGTERM drains it
        proc = _serve(optimized, spool, log, http, dicom, triton_grpc)
        _wait(lambda: _finished(spool), 120, "the new pod to finish the work")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert _port_free(triton_grpc) and _port_free(http) and _port_free(dicom)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    rows = _rows(spool)
    sops = [r[2] for r in rows]
    assert len(sops) == len(set(sops))  # one row per instance
    by_sop = {r[2]: r for r in rows}
    for files, acked in ((files_s, acked_s), (files_t, acked_t), (files_u, acked_u)):
        for path in acked:  # every acknowledged instance: inferred, with its own one result
            row = by_sop[uid_hash(files[path])]
            assert row[3] == "inferred", row
            doc = ResultStore(spool).stored(row[1], row[2])
            assert doc is not None and doc[ResultStore.JOB_KEY] == row[0]
            assert "error" not in doc
    # the study that reached both processes is one group, keyed in the job table
    assert len({r[4] for r in rows if r[1] == uid_hash(study_s)}) == 1
    stored = list((spool / "results").rglob("*.json"))
    assert len(stored) == len(rows)  # one result file per job, none twice
    assert not list((spool / "incoming").glob("*.dcm"))
    text = log.read_text(errors="replace")
    assert not any(uid in text for uid in [study_s, study_t, study_u, *files_s.values(),
                                           *files_t.values(), *files_u.values()])
