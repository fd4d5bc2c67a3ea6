"""Series grouping with real peers: dcmtk's storescu sends a series to `bedside gateway
--group-level series`, the gateway is killed with SIGKILL while the group is open, and the
restarted gateway closes the group and infers every acknowledged instance once on the real
bundled Triton (proved by Triton's own request count)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from loadtests.stack import GatewayProcess
from services.gateway.store.jobs import INFERRED, RECEIVED
from tests.integration.peers import MODEL, Triton
from tests.integration.test_durability import (
    _acknowledged,
    _rows,
    _storescu,
    _wait,
    _write_study,
)

pytestmark = pytest.mark.integration


class Gateway(GatewayProcess):
    """``bedside gateway --group-level series`` as a subprocess that can be killed for real;
    one gateway process (the Triton request count includes one warm-up per process)."""

    def __init__(self, repository: Path, spool: Path, triton_url: str, log: Path,
                 timeout_s: float) -> None:
        super().__init__(repository, MODEL, spool, triton_url, log, "--group-level", "series",
                         "--group-timeout", str(timeout_s), "--processes", "1")


def test_open_series_group_survives_sigkill_and_is_inferred_once_on_real_triton(
    triton: Triton, optimized: Path, tmp_path: Path,
) -> None:
    repository, spool, log = optimized / "repository", tmp_path / "spool", tmp_path / "gw.log"
    study, files = _write_study(tmp_path / "series", 6, seed=500)
    gw = Gateway(repository, spool, triton.grpc_url, log, timeout_s=600)
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
    baseline = triton.successful_requests()
    gw = Gateway(repository, spool, triton.grpc_url, log, timeout_s=1)
    try:
        _wait(lambda: len(_rows(spool)) == 6 and all(r[2] == INFERRED for r in _rows(spool)),
              60, "the reopened group to close and infer")
        body = httpx.get(f"{gw.url}/v1/studies/{study}/results", timeout=10).json()
        requests = triton.successful_requests() - baseline
    finally:
        gw.kill(signal.SIGTERM)
    assert body["status"] == "done" and len(body["instances"]) == 6
    assert {r["sop_instance_uid"] for r in body["instances"]} == set(files.values())
    assert all("error" not in r for r in body["instances"])
    assert requests == 6 + 1  # each instance once, plus the restarted gateway's warm-up
    assert not list((spool / "incoming").glob("*.dcm"))
    assert study not in log.read_text(errors="replace")  # hashed UIDs only in the logs
