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
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from loadtests.stack import GatewayProcess, bedside_executable, wait_http_ok
from services.gateway.security.auth import hash_key, new_key
from services.net import free_port
from tests.conftest import TINY_MANIFEST
from tests.gateway.harness import model_repository
from tests.gateway.util import make_instance

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


def test_serve_killed_with_sigkill_leaves_no_tritonserver_behind(
        optimized: Path, tmp_path: Path) -> None:
    """``bedside serve``: its tritonserver sits in a session of its own, yet dies with it."""
    http, dicom, triton_grpc = free_port(), free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(bedside_executable()), "serve", "--repository", str(optimized / "repository"),
             "--model", MODEL, "--spool", str(tmp_path / "spool"), "--http-port", str(http),
             "--dicom-port", str(dicom), "--grpc-port", "0", "--triton-grpc-port",
             str(triton_grpc), "--no-auth", "--plaintext", "--processes", "2",
             "--min-free-bytes", "0"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http_ok(f"http://127.0.0.1:{http}/readyz", 120, proc, log)
        tritons = [int(p) for p in subprocess.run(
            ["pgrep", "-f", "--", f"--grpc-port={triton_grpc}"], capture_output=True, text=True,
            check=False).stdout.split()]
        assert tritons, "no tritonserver found"
        stubs = [c for t in tritons for c in _children(t)]  # its python backend stubs
        gateways = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _wait(lambda: not any(_alive(p) for p in [*tritons, *stubs, *gateways]), 30,
              "tritonserver and the gateway processes to exit")
        _wait(lambda: _port_free(triton_grpc) and _port_free(http), 10, "the ports")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
