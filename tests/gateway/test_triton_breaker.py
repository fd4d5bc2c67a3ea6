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
from tritonclient.utils import InferenceServerException

from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.errors import InferenceFailed, Unavailable
from services.gateway.inference.triton import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    TritonInferer,
    resolve_io,
)
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


def test_tensor_names_come_from_model_metadata() -> None:
    one = {"inputs": [{"name": "x", "datatype": "FP16"}], "outputs": [{"name": "y"}]}
    io_ = resolve_io(one, "image", "logits")  # single tensors: Triton's names win
    assert (io_.input_name, io_.input_datatype, io_.output_name) == ("x", "FP16", "y")
    two = {"inputs": [{"name": "a", "datatype": "FP32"}, {"name": "image", "datatype": "FP32"}],
           "outputs": [{"name": "logits"}, {"name": "aux"}]}
    assert resolve_io(two, "image", "logits").input_name == "image"
    with pytest.raises(InferenceFailed, match=r"no input named 'img' \(it has: a, image\)"):
        resolve_io(two, "img", "logits")
    with pytest.raises(InferenceFailed, match="no output named"):
        resolve_io(two, "image", "out")


class _FakeAioTriton:
    """Stands in for tritonclient's aio client: UNAVAILABLE ``failures`` times, then answers."""

    def __init__(self, failures: int, status: str = "StatusCode.UNAVAILABLE") -> None:
        self.failures = failures
        self.status = status
        self.calls = 0

    async def get_model_metadata(self, *args: object, **kwargs: object) -> dict[str, object]:
        return {"inputs": [{"name": "image", "datatype": "FP32"}],
                "outputs": [{"name": "logits"}]}

    async def infer(self, model: str, inputs: list[object], **kwargs: object) -> object:
        self.calls += 1
        if self.calls <= self.failures:
            raise InferenceServerException("down", status=self.status)
        n = inputs[0].shape()[0]  # type: ignore[attr-defined]

        class _Result:
            def as_numpy(self, name: str) -> np.ndarray:
                return np.full((n, 1), 0.5, dtype=np.float32)

        return _Result()

    async def close(self) -> None:
        return None


def _with_fake_aio(fake: _FakeAioTriton, retries: int) -> TritonInferer:
    inferer = TritonInferer(f"127.0.0.1:{free_port()}", "m", "image", "logits", timeout_s=5.0,
                            retries=retries, retry_pause_s=0.01)
    inferer._client = fake  # type: ignore[assignment]
    return inferer


def test_unavailable_is_retried_inside_one_call_with_fake_aio_triton() -> None:
    fake = _FakeAioTriton(failures=2)
    inferer = _with_fake_aio(fake, retries=2)
    try:
        out = inferer.infer(np.zeros((3, 1, 8, 8), dtype=np.float32))
        assert out.shape == (3, 1) and fake.calls == 3
        assert inferer.breaker.state == CLOSED
    finally:
        inferer.close()


def test_retries_are_bounded_and_permanent_errors_not_retried_with_fake_aio_triton() -> None:
    fake = _FakeAioTriton(failures=10)
    inferer = _with_fake_aio(fake, retries=2)
    try:
        with pytest.raises(Unavailable):
            inferer.infer(np.zeros((1, 1, 8, 8), dtype=np.float32))
        assert fake.calls == 3
    finally:
        inferer.close()
    fake = _FakeAioTriton(failures=10, status="StatusCode.INVALID_ARGUMENT")
    inferer = _with_fake_aio(fake, retries=2)
    try:
        with pytest.raises(InferenceFailed):
            inferer.infer(np.zeros((1, 1, 8, 8), dtype=np.float32))
        assert fake.calls == 1
    finally:
        inferer.close()
