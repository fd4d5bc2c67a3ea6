"""Durable spool and worker, with a fake Triton (unit level)."""

from __future__ import annotations

import time
from pathlib import Path

from services.gateway.inference.core import InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.processing.worker import Job, SpoolWorker
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.util import bad_window_center, dicom_bytes, make_instance


def _wait(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_put_is_durable_and_listed_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a, b = spool.put(b"first"), spool.put(b"second")
    assert spool.pending() == [a, b]
    assert a.read_bytes() == b"first"
    assert not list(spool.incoming.glob("*.tmp"))


def test_work_left_in_spool_is_processed_after_restart_with_fake_triton(tmp_path: Path) -> None:
    ds = make_instance()
    Spool(tmp_path).put(dicom_bytes(ds))  # acknowledged before a "crash"
    spool, results = Spool(tmp_path), ResultStore(tmp_path)
    worker = SpoolWorker(InferenceCore(TINY_MANIFEST, FakeInferer()), spool, results,
                         GatewayMetrics(), backoff_s=0.01)
    worker.start()
    try:
        assert _wait(lambda: len(results.for_study(ds.StudyInstanceUID)) == 1)
        assert _wait(lambda: spool.pending() == [])  # removed just after the result
    finally:
        worker.stop()


def test_triton_outage_delays_but_loses_nothing_with_fake_triton(tmp_path: Path) -> None:
    fake = FakeInferer(unavailable_calls=3)
    spool, results = Spool(tmp_path), ResultStore(tmp_path)
    worker = SpoolWorker(InferenceCore(TINY_MANIFEST, fake), spool, results, GatewayMetrics(),
                         backoff_s=0.01)
    worker.start()
    instances = [make_instance(i) for i in range(3)]
    try:
        for ds in instances:
            worker.submit(Job(path=spool.put(dicom_bytes(ds)), protocol="dimse"))
        for ds in instances:
            assert _wait(lambda ds=ds: len(results.for_study(ds.StudyInstanceUID)) == 1)
        assert fake.calls == 3 + 3
        assert _wait(lambda: spool.pending() == [])  # removed just after the result
    finally:
        worker.stop()


def test_bad_pixels_after_ack_store_an_error_result(tmp_path: Path) -> None:
    ds = make_instance()
    ds.PixelData = ds.PixelData[:100]  # header fine, pixels truncated
    spool, results = Spool(tmp_path), ResultStore(tmp_path)
    worker = SpoolWorker(InferenceCore(TINY_MANIFEST, FakeInferer()), spool, results,
                         GatewayMetrics(), backoff_s=0.01)
    worker.start()
    try:
        worker.submit(Job(path=spool.put(dicom_bytes(ds)), protocol="dimse"))
        assert _wait(lambda: len(results.for_study(ds.StudyInstanceUID)) == 1)
        [stored] = results.for_study(ds.StudyInstanceUID)
        assert stored["error"]["reason"] == "truncated_pixel_data"
    finally:
        worker.stop()


def test_worker_survives_a_bug_and_quarantines_with_fake_triton(tmp_path: Path) -> None:
    fake = FakeInferer()
    fake.crash_next = True
    spool, results = Spool(tmp_path), ResultStore(tmp_path)
    worker = SpoolWorker(InferenceCore(TINY_MANIFEST, fake), spool, results, GatewayMetrics(),
                         backoff_s=0.01)
    worker.start()
    first, second = make_instance(1), make_instance(2)
    try:
        worker.submit(Job(path=spool.put(dicom_bytes(first)), protocol="dimse"))
        worker.submit(Job(path=spool.put(dicom_bytes(second)), protocol="dimse"))
        assert _wait(lambda: len(results.for_study(second.StudyInstanceUID)) == 1)
        # the depth drops just after the result is stored: wait for it, do not race it
        assert _wait(lambda: worker.depth == 0)
        assert worker.alive
        assert len(list(spool.failed.glob("*.dcm"))) == 1  # kept, not deleted
        assert results.for_study(first.StudyInstanceUID) == []
    finally:
        worker.stop()


def test_malformed_header_after_ack_gets_error_result(tmp_path: Path) -> None:
    ds = make_instance()
    ds[0x00281050] = bad_window_center()
    spool, results = Spool(tmp_path), ResultStore(tmp_path)
    worker = SpoolWorker(InferenceCore(TINY_MANIFEST, FakeInferer()), spool, results,
                         GatewayMetrics(), backoff_s=0.01)
    worker.start()
    try:
        worker.submit(Job(path=spool.put(dicom_bytes(ds)), protocol="dimse"))
        assert _wait(lambda: len(results.for_study(ds.StudyInstanceUID)) == 1)
        assert results.for_study(ds.StudyInstanceUID)[0]["error"]["reason"] == "bad_pixels"
        assert worker.alive
    finally:
        worker.stop()
