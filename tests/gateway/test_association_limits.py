"""DIMSE association limits against a whole gateway (real sockets, Triton faked): one calling AE
title cannot hold every association slot, and no association outlives its lifetime cap. The
peers are real: pynetdicom associations and dcmtk's echoscu."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from pynetdicom import AE
from pynetdicom.association import Association

from services.errors import ConfigError
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from tests.conftest import TINY_MANIFEST
from tests.gateway.harness import fake_gateway, model_repository, wait_for

ECHOSCU = "/usr/bin/echoscu"
VERIFICATION = "1.2.840.10008.1.1"


def _associate(gw: Gateway, calling: str) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    return ae.associate(gw.config.dicom_host, gw.config.dicom_port, ae_title=gw.config.ae_title)


def _echoscu(gw: Gateway, calling: str) -> tuple[int, str]:
    if not os.access(ECHOSCU, os.X_OK):
        pytest.fail(f"{ECHOSCU} missing: install Debian dcmtk (scripts/dev.sh setup as root)")
    proc = subprocess.run(
        [ECHOSCU, "-v", "-aet", calling, "-aec", gw.config.ae_title, gw.config.dicom_host,
         str(gw.config.dicom_port)], capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _counted(gw: Gateway, outcome: str, reason: str) -> float:
    text = generate_latest(gw.metrics.registry).decode()
    prefix = (f'bedside_gateway_requests_total{{outcome="{outcome}",protocol="dimse",'
              f'reason="{reason}"}} ')
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix):]) if lines else 0.0


def test_one_calling_ae_cannot_hold_every_association_with_dcmtk(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    trail = tmp_path / "audit.jsonl"
    gw = fake_gateway(tmp_path, max_associations=4, max_associations_per_ae=2,
                      audit_log=trail)
    held: list[Association] = []
    try:
        for _ in range(2):
            held.append(_associate(gw, "GREEDY"))
            assert held[-1].is_established
        # A third from the same calling AE: rejected (transient, local limit exceeded), though
        # the gateway has two slots free ...
        third = _associate(gw, "GREEDY")
        assert third.is_rejected and not third.is_established
        rj = third.acceptor.primitive
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        rc, out = _echoscu(gw, "GREEDY")
        assert rc != 0 and "Local Limit Exceeded" in out, out
        # ... which another calling AE title still gets.
        rc, out = _echoscu(gw, "OTHER")
        assert rc == 0 and "Received Echo Response (Success)" in out, out
        for assoc in held:
            assert assoc.send_c_echo().Status == 0x0000  # the held ones are unharmed
        # A released association frees its calling AE's slot.
        held.pop().release()
        assert wait_for(lambda: _echoscu(gw, "GREEDY")[0] == 0)
        assert _counted(gw, "rejected", "calling_ae_association_limit") == 2.0
    finally:
        for assoc in held:
            assoc.release()
        gw.stop()
    rejections = [r.getMessage() for r in caplog.records
                  if "calling_ae_association_limit" in r.getMessage()]
    assert len(rejections) == 2 and all("GREEDY" in m for m in rejections)
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    refused = [r for r in records if r["outcome"] == "calling_ae_association_limit"]
    assert [(r["event"], r["principal"], r["status"], r["reason"]) for r in refused] == [
        ("association", "ae:GREEDY", "A-ASSOCIATE-RJ", "calling_ae_association_limit")] * 2
    assert {r["principal"] for r in records if r["status"] == "A-ASSOCIATE-AC"} == {
        "ae:GREEDY", "ae:OTHER"}


def test_association_kept_alive_past_its_lifetime_is_aborted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    trail = tmp_path / "audit.jsonl"
    gw = fake_gateway(tmp_path, association_lifetime_s=3.0, audit_log=trail)
    try:
        assoc = _associate(gw, "KEEPALIVE")
        assert assoc.is_established
        opened = time.monotonic()
        echoes = 0
        while assoc.is_established and time.monotonic() - opened < 15:
            rsp = assoc.send_c_echo()  # a C-ECHO every second keeps it busy, not idle
            if "Status" in rsp and rsp.Status == 0x0000:
                echoes += 1
            time.sleep(1.0)
        lasted = time.monotonic() - opened
        assert not assoc.is_established and assoc.is_aborted
        assert echoes >= 2 and 2.5 <= lasted < 8, (echoes, lasted)
        fresh = _associate(gw, "KEEPALIVE")  # the peer may associate again
        assert fresh.is_established and fresh.send_c_echo().Status == 0x0000
        fresh.release()
        assert _counted(gw, "aborted", "association_lifetime") == 1.0
    finally:
        gw.stop()
    assert any("association_lifetime" in r.getMessage() and "KEEPALIVE" in r.getMessage()
               for r in caplog.records)
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    aborts = [r for r in records if r["action"] == "abort"]
    assert [(r["event"], r["principal"], r["outcome"], r["status"]) for r in aborts] == [
        ("association", "ae:KEEPALIVE", "association_lifetime", "A-ABORT")]


def test_association_limits_are_validated(tmp_path: Path) -> None:
    base = dict(model_repository=model_repository(tmp_path), model_name=TINY_MANIFEST.name,
                triton_grpc_url="unused:1", spool_dir=tmp_path / "spool")
    with pytest.raises(ConfigError, match="max_associations_per_ae"):
        GatewayConfig(**base, max_associations_per_ae=-1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="association_lifetime_s"):
        GatewayConfig(**base, association_lifetime_s=-1.0)  # type: ignore[arg-type]
