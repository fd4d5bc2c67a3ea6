"""The Triton circuit breaker: the state machine on a fake clock, then the real gRPC client and
the whole gateway against a port where no Triton listens (connection refused)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.errors import Unavailable
from services.gateway.triton import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, TritonInferer
from services.net import free_port
from tests.conftest import TINY_MANIFEST
from tests.gateway.harness import base_url, model_repository
from tests.gateway.util import dicom_bytes, make_instance


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_k_failures_then_probes_once_after_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_s=10.0, clock=clock)
    for _ in range(2):
        breaker.before_call()
        breaker.failure()
    assert breaker.state == CLOSED
    breaker.before_call()
    breaker.failure()
    assert breaker.state == OPEN and breaker.retry_after_s() == 10.0
    with pytest.raises(Unavailable) as info:
        breaker.before_call()
    assert info.value.reason == "triton_circuit_open"
    clock.now = 10.0
    assert breaker.state == HALF_OPEN
    breaker.before_call()  # the probe
    with pytest.raises(Unavailable):  # only one probe at a time
        breaker.before_call()
    breaker.failure()  # probe failed: open for another cool-down
    assert breaker.state == OPEN
    clock.now = 15.0
    with pytest.raises(Unavailable):
        breaker.before_call()
    clock.now = 20.0
    breaker.before_call()
    breaker.success()
    assert breaker.state == CLOSED and breaker.retry_after_s() == 0.0
    breaker.before_call()


def test_a_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=1.0, clock=Clock())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.state == CLOSED


def test_real_client_fails_fast_once_open_with_no_triton() -> None:
    inferer = TritonInferer(f"127.0.0.1:{free_port()}", "m", "image", "logits", timeout_s=2.0,
                            breaker=CircuitBreaker(failures=2, cooldown_s=60.0))
    batch = np.zeros((1, 1, 8, 8), dtype=np.float32)
    try:
        reasons = []
        for _ in range(3):
            with pytest.raises(Unavailable) as info:
                inferer.infer(batch)
            reasons.append(info.value.reason)
        assert reasons == ["triton_unavailable", "triton_unavailable", "triton_circuit_open"]
        start = time.perf_counter()
        with pytest.raises(Unavailable):
            inferer.infer(batch)
        assert time.perf_counter() - start < 0.05  # no network call at all
        assert inferer.breaker.state == OPEN
    finally:
        inferer.close()


def test_gateway_with_no_triton_answers_503_and_keeps_acknowledging_to_the_spool(
    tmp_path: Path,
) -> None:
    gw = Gateway(GatewayConfig(
        model_repository=model_repository(tmp_path), model_name=TINY_MANIFEST.name,
        triton_grpc_url=f"127.0.0.1:{free_port()}", spool_dir=tmp_path / "spool",
        http_port=free_port(), dicom_port=free_port(), triton_timeout_s=2.0,
        triton_retry_backoff_s=0.05, triton_breaker_failures=2, triton_breaker_cooldown_s=60.0,
    ))
    gw.start()
    try:
        data = dicom_bytes(make_instance(1))
        for _ in range(3):
            r = httpx.post(f"{base_url(gw)}/v1/infer", content=data,
                           headers={"Content-Type": "application/dicom"}, timeout=10)
            assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.json()["error"]["reason"] == "triton_circuit_open"
        ae = AE(ae_title="SCU")
        ae.requested_contexts = StoragePresentationContexts[:20]
        assoc = ae.associate("127.0.0.1", gw.config.dicom_port, ae_title="BEDSIDE")
        assert assoc.is_established
        try:
            for seed in range(3):
                assert assoc.send_c_store(make_instance(10 + seed)).Status == 0x0000
        finally:
            assoc.release()
        assert len(gw.spool.pending()) == 3 and gw.worker.jobs.count("received") == 3
        metrics = httpx.get(f"{base_url(gw)}/metrics").text
        assert 'bedside_gateway_triton_breaker{state="open"} 1.0' in metrics
        assert 'bedside_gateway_jobs{state="received"} 3.0' in metrics
    finally:
        gw.stop()
