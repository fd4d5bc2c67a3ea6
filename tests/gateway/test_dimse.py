"""DIMSE edge with a real pynetdicom association and a fake Triton (unit level)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from services.gateway.config import GatewayConfig
from services.gateway.core import InferenceCore
from services.gateway.dimse import DicomServer
from services.gateway.ingest import Ingestor
from services.gateway.metrics import GatewayMetrics
from services.gateway.spool import ResultStore, Spool
from services.gateway.worker import SpoolWorker
from services.net import free_port
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.util import make_instance


class _Stack:
    def __init__(self, tmp: Path, max_spool_depth: int = 1000) -> None:
        repo = tmp / "repo" / TINY_MANIFEST.name
        repo.mkdir(parents=True)
        TINY_MANIFEST.save(repo / "manifest.json")
        self.config = GatewayConfig(
            model_repository=tmp / "repo", model_name=TINY_MANIFEST.name,
            triton_grpc_url="unused:1", spool_dir=tmp / "spool", dicom_port=free_port(),
            max_spool_depth=max_spool_depth,
        )
        self.fake = FakeInferer()
        self.metrics = GatewayMetrics()
        core = InferenceCore(TINY_MANIFEST, self.fake)
        self.spool, self.results = Spool(tmp / "spool"), ResultStore(tmp / "spool")
        self.worker = SpoolWorker(core, self.spool, self.results, self.metrics, 0.01)
        ingestor = Ingestor(core, self.spool, self.worker, self.metrics,
                            self.config.max_spool_depth, self.config.max_request_bytes)
        self.server = DicomServer(self.config, ingestor, self.metrics)

    def send(self, *datasets):  # type: ignore[no-untyped-def]
        ae = AE(ae_title="UNITSCU")
        ae.requested_contexts = StoragePresentationContexts[:100]
        assoc = ae.associate("127.0.0.1", self.config.dicom_port, ae_title="BEDSIDE")
        assert assoc.is_established
        try:
            return [assoc.send_c_store(ds) for ds in datasets]
        finally:
            assoc.release()


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[_Stack]:
    s = _Stack(tmp_path)
    s.worker.start()
    s.server.start()
    yield s
    s.server.stop()
    s.worker.stop()


def test_store_success_only_after_spool_with_fake_triton(stack: _Stack) -> None:
    ds = make_instance()
    [rsp] = stack.send(ds)
    assert rsp.Status == 0x0000
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not stack.results.for_study(ds.StudyInstanceUID):
        time.sleep(0.02)
    [result] = stack.results.for_study(ds.StudyInstanceUID)
    assert result["findings"][0]["label"] == "lesion"
    assert {"receive", "spool", "queue", "total", "gateway_overhead"} <= set(result["timings_ms"])


def test_statuses_for_bad_instances_with_fake_triton(stack: _Stack) -> None:
    sr = make_instance()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    no_pixels = make_instance(1)
    del no_pixels.PixelData
    mr = make_instance(2)
    mr.Modality = "MR"
    bad_value = make_instance(3)
    # NumberOfFrames "abc": a malformed IS value, sent raw as a careless modality might
    bad_value[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 4, b"abc ", 0, False, True)
    responses = stack.send(sr, no_pixels, mr, bad_value, make_instance(4))
    statuses = [int(r.Status) for r in responses]
    assert statuses[:4] == [0x0122, 0xA900, 0xC000, 0xC000]
    assert "Pixel Data" in str(responses[1].ErrorComment)
    assert statuses[4] == 0x0000  # still serving


def test_back_pressure_when_spool_is_full_with_fake_triton(tmp_path: Path) -> None:
    stack = _Stack(tmp_path, max_spool_depth=1)
    stack.server.start()  # worker not started: nothing drains the spool
    try:
        statuses = [int(r.Status) for r in stack.send(make_instance(1), make_instance(2))]
        assert statuses == [0x0000, 0xA700]
        assert len(stack.spool.pending()) == 1  # the acknowledged one is on disk
    finally:
        stack.server.stop()


def test_no_patient_data_in_logs_or_metrics_with_fake_triton(
    stack: _Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ds = make_instance()
    ds.PatientName = "ZZTOPSECRET^WILHELMINA"
    ds.PatientID = "PID-8675309"
    ds.StudyInstanceUID = "1.2.3.4.5.6.7.8.999.31415926"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.8.999.27182818"
    no_pixels = make_instance(1)
    no_pixels.PatientName = "ZZTOPSECRET^WILHELMINA"
    del no_pixels.PixelData
    stack.send(ds, no_pixels)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not stack.results.for_study(ds.StudyInstanceUID):
        time.sleep(0.02)
    assert stack.results.for_study(ds.StudyInstanceUID)
    from prometheus_client import generate_latest

    exposed = caplog.text + generate_latest(stack.metrics.registry).decode()
    assert "dimse" in exposed  # we did capture the gateway's own output
    for secret in ("ZZTOPSECRET", "WILHELMINA", "8675309", "31415926", "27182818"):
        assert secret not in exposed
