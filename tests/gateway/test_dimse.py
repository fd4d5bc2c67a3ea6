"""DIMSE edge with a real pynetdicom association and a fake Triton (unit level)."""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from services.errors import ConfigError
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.edges.dimse import DicomServer
from services.gateway.inference.core import InferenceCore
from services.gateway.intake.ingest import Ingestor
from services.gateway.metrics import GatewayMetrics
from services.gateway.processing.worker import SpoolWorker
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from services.net import free_port
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import fake_gateway, model_repository, wait_for
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
    assert statuses[:4] == [0x0122, 0xA900, 0xC001, 0xC000]  # MR: not for this model
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


# --- calling-AE allowlist (real dcmtk clients), max PDU, DICOM TLS ------------------------

ECHOSCU, STORESCU = "/usr/bin/echoscu", "/usr/bin/storescu"


def _dcmtk(tool: str, gw: Gateway, calling: str, *args: str) -> tuple[int, str]:
    if not os.access(tool, os.X_OK):
        pytest.fail(f"{tool} missing: install Debian dcmtk (scripts/dev.sh setup as root)")
    proc = subprocess.run(
        [tool, "-v", "-aet", calling, "-aec", gw.config.ae_title, gw.config.dicom_host,
         str(gw.config.dicom_port), *args],
        capture_output=True, text=True, timeout=60, check=False,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture()
def allowlisted(tmp_path: Path) -> Iterator[Gateway]:
    gw = fake_gateway(tmp_path, allowed_calling_aets=("MODALITY1", "PACS"), max_pdu_bytes=4096)
    yield gw
    gw.stop()


def test_allowlist_admits_listed_calling_ae_titles_with_dcmtk(
    allowlisted: Gateway, tmp_path: Path
) -> None:
    rc, out = _dcmtk(ECHOSCU, allowlisted, "MODALITY1")
    assert rc == 0 and "Received Echo Response (Success)" in out, out
    path = tmp_path / "i.dcm"
    ds = make_instance(3)
    ds.save_as(path, enforce_file_format=True)
    rc, out = _dcmtk(STORESCU, allowlisted, "PACS", str(path))  # 128x128 in 4 KiB PDUs
    assert rc == 0 and "Received Store Response (Success)" in out, out
    assert wait_for(lambda: bool(allowlisted.results.for_study(ds.StudyInstanceUID)))


def test_allowlist_rejects_and_logs_other_calling_ae_titles_with_dcmtk(
    allowlisted: Gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rc, out = _dcmtk(ECHOSCU, allowlisted, "INTRUDER")
    assert rc != 0 and "Calling AE Title Not Recognized" in out, out
    ds = make_instance(4)
    ds.PatientName = "ZZSECRET^PATIENT"
    path = tmp_path / "i.dcm"
    ds.save_as(path, enforce_file_format=True)
    rc, out = _dcmtk(STORESCU, allowlisted, "MODALITY2", str(path))
    assert rc != 0 and "Received Store Response" not in out, out
    assert allowlisted.spool.pending() == [] and not list(allowlisted.results.root.iterdir())
    rejections = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert any("INTRUDER" in m and "calling_ae_not_allowed" in m for m in rejections)
    assert any("MODALITY2" in m for m in rejections)
    assert "ZZSECRET" not in caplog.text
    from prometheus_client import generate_latest

    text = generate_latest(allowlisted.metrics.registry).decode()
    assert ('bedside_gateway_requests_total{outcome="rejected",protocol="dimse",'
            'reason="calling_ae_not_allowed"} 2.0') in text
    assert _dcmtk(ECHOSCU, allowlisted, "MODALITY1")[0] == 0  # still serving


def test_max_pdu_is_offered_to_the_peer(allowlisted: Gateway) -> None:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", allowlisted.config.dicom_port, ae_title="BEDSIDE")
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == 4096
    finally:
        assoc.release()


def test_refused_store_reasons_are_logged(stack: _Stack,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    no_pixels = make_instance(1)
    del no_pixels.PixelData
    sr = make_instance(2)
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    stack.send(no_pixels, sr)
    refused = [r.getMessage() for r in caplog.records if "C-STORE refused" in r.getMessage()]
    assert any("0xA900: no_pixel_data" in m for m in refused), refused
    assert any("0x0122: unsupported_sop_class" in m for m in refused), refused


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _pki(root: Path) -> Path:
    """A throwaway CA that signs a server certificate (localhost) and a client certificate."""
    root.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=Bedside test CA", cwd=root)
    (root / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=root)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", "san.ext", cwd=root)
    return root


def _tls_client(pki: Path, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if with_cert:
        ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    return ctx


def test_dicom_tls_with_client_certificates(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki")
    gw = fake_gateway(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      tls_ca=pki / "ca.pem")
    try:
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.requested_contexts = [*ae.requested_contexts, *StoragePresentationContexts[:20]]
        ae.acse_timeout = ae.network_timeout = 5
        port = gw.config.dicom_port
        assoc = ae.associate("127.0.0.1", port, ae_title="BEDSIDE",
                             tls_args=(_tls_client(pki, True), "localhost"))
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0x0000
            ds = make_instance(5)
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        assert wait_for(lambda: bool(gw.results.for_study(ds.StudyInstanceUID)))
        # no client certificate: the handshake fails, no association
        assoc = ae.associate("127.0.0.1", port, ae_title="BEDSIDE",
                             tls_args=(_tls_client(pki, False), "localhost"))
        assert not assoc.is_established
        # plain TCP to the TLS port: no association either
        assert not ae.associate("127.0.0.1", port, ae_title="BEDSIDE").is_established
        # and the listener still serves good clients
        assoc = ae.associate("127.0.0.1", port, ae_title="BEDSIDE",
                             tls_args=(_tls_client(pki, True), "localhost"))
        assert assoc.is_established
        assoc.release()
    finally:
        gw.stop()


def test_tls_configuration_is_validated(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki")
    base = dict(model_repository=model_repository(tmp_path), model_name=TINY_MANIFEST.name,
                triton_grpc_url="unused:1", spool_dir=tmp_path / "spool")
    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        GatewayConfig(**base, tls_cert=pki / "server.pem")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs tls_cert"):
        GatewayConfig(**base, tls_ca=pki / "ca.pem")  # type: ignore[arg-type]
    swapped = GatewayConfig(**base, tls_cert=pki / "server.pem",  # type: ignore[arg-type]
                            tls_key=pki / "client.key")
    with pytest.raises(ConfigError, match="unusable"):
        swapped.dicom_tls_context()
    with pytest.raises(ConfigError, match="allowed calling AE title"):
        GatewayConfig(**base,  # type: ignore[arg-type]
                      allowed_calling_aets=("WAY_TOO_LONG_AE_TITLE",))
    with pytest.raises(ConfigError, match="max_pdu_bytes"):
        GatewayConfig(**base, max_pdu_bytes=100)  # type: ignore[arg-type]
