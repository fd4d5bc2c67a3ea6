"""Series grouping with real peers: dcmtk's storescu sends a series to `bedside gateway
--group-level series`, the gateway is killed with SIGKILL while the group is open, and the
restarted gateway closes the group and infers every acknowledged instance once on the real
bundled Triton (proved by Triton's own request count)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.gateway.jobs import INFERRED, RECEIVED
from services.net import free_port
from tests.integration.test_durability import (
    MODEL,
    STORESCU,
    Triton,
    _acknowledged,
    _rows,
    _storescu,
    _wait,
    _write_study,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def real_triton(optimized: Path, tmp_path: Path) -> Iterator[Triton]:
    if not os.access(STORESCU, os.X_OK):
        pytest.fail(f"{STORESCU} missing: install Debian dcmtk (scripts/dev.sh setup as root)")
    server = Triton(optimized / "repository", tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Gateway:
    """``bedside gateway --group-level series`` as a subprocess that can be killed for real."""

    def __init__(self, repository: Path, spool: Path, triton_url: str, log: Path,
                 timeout_s: float) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        bedside = Path(sys.executable).with_name("bedside")
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(bedside), "gateway", "--repository", str(repository), "--model", MODEL,
                 "--spool", str(spool), "--http-port", str(self.http_port),
                 "--dicom-port", str(self.dicom_port), "--grpc-port", "0",
                 "--triton-url", triton_url, "--no-auth", "--plaintext",
                 "--group-level", "series", "--group-timeout", str(timeout_s)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self._healthy, 60, "the gateway to start")

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, "gateway exited"
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=30)


def test_open_series_group_survives_sigkill_and_is_inferred_once_on_real_triton(
    real_triton: Triton, optimized: Path, tmp_path: Path,
) -> None:
    repository, spool, log = optimized / "repository", tmp_path / "spool", tmp_path / "gw.log"
    study, files = _write_study(tmp_path / "series", 6, seed=500)
    gw = Gateway(repository, spool, real_triton.grpc_url, log, timeout_s=600)
    try:
        proc = _storescu(gw.dicom_port, list(files))
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and len(_acknowledged(out)) == 6, out
        body = httpx.get(f"{gw.url}/v1/studies/{study}/results", timeout=10).json()
        assert (body["status"], body["pending"]) == ("pending", 6)  # the group is open
        time.sleep(0.5)
        assert all(r[2] == RECEIVED for r in _rows(spool))
    finally:
        gw.kill()  # SIGKILL with the group open
    baseline = real_triton.successful_requests()
    gw = Gateway(repository, spool, real_triton.grpc_url, log, timeout_s=1)
    try:
        _wait(lambda: len(_rows(spool)) == 6 and all(r[2] == INFERRED for r in _rows(spool)),
              60, "the reopened group to close and infer")
        body = httpx.get(f"{gw.url}/v1/studies/{study}/results", timeout=10).json()
        requests = real_triton.successful_requests() - baseline
    finally:
        gw.kill(signal.SIGTERM)
    assert body["status"] == "done" and len(body["instances"]) == 6
    assert {r["sop_instance_uid"] for r in body["instances"]} == set(files.values())
    assert all("error" not in r for r in body["instances"])
    assert requests == 6 + 1  # each instance once, plus the restarted gateway's warm-up
    assert not list((spool / "incoming").glob("*.dcm"))
    assert study not in log.read_text(errors="replace")  # hashed UIDs only in the logs
