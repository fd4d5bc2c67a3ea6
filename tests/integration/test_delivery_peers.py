"""Results delivery to real peers: dcmtk ``storescp`` as the C-STORE destination (plain TCP and
mutual DICOM TLS, certificates made with openssl), a real Orthanc's DICOMweb STOW-RS, a
destination that is down and then comes up, destinations that refuse for good. What the peers
stored is validated with dciodvfy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from services.gateway.delivery.outbox import DEAD, DELIVERED, PENDING
from services.gateway.delivery.routing import (
    DimseDestination,
    Retry,
    Route,
    RoutesConfig,
    StowDestination,
)
from services.gateway.delivery.service import DeliveryService
from services.gateway.metrics import GatewayMetrics
from services.net import free_port
from tests.gateway import dicom_validators
from tests.gateway.groups import CLASSIFIER, PHI, SEGMENTER, make_group, study_with_phi
from tests.integration.orthanc import OrthancServer

pytestmark = pytest.mark.integration
STORESCP = "/usr/bin/storescp"
SECRET = b"integration-deid-secret-0123456789"
FAST = Retry(base_s=0.1, cap_s=0.4, max_attempts=200, max_age_s=0)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
DICOMDIR = "Missing attribute or value that would be needed to build DICOMDIR"
EMPTIED = {"Patient ID", "Study ID", "Study Date", "Study Time"}
# A storescp profile that takes CT images only: an SR gets no presentation context.
IMAGES_ONLY = """
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed
[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly
"""


class StoreScp:
    """dcmtk storescp on ``port``, writing what it receives to ``out``."""

    def __init__(self, work: Path, port: int, *options: str) -> None:
        if not os.access(STORESCP, os.X_OK):
            pytest.fail("dcmtk storescp missing: scripts/dev.sh setup (as root)")
        self.out = work / "received"
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log = work / "storescp.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [STORESCP, "-aet", "DEST", "--output-directory", str(self.out), *options,
                 str(port)], stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, TCP_NODELAY="1"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("storescp exited: " + self.log.read_text(errors="replace"))
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("storescp did not listen")

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def dciodvfy_file(path: Path) -> list[str]:
    """dciodvfy's findings that count (tests/gateway/dicom_validators.py lists the others)."""
    return dicom_validators.problems("dciodvfy", dicom_validators.dciodvfy(path),
                                     pydicom.dcmread(path))


def wait_for(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.fixture()
def services(tmp_path: Path) -> Iterator[Callable[..., DeliveryService]]:
    started: list[DeliveryService] = []

    def make(*destinations: DimseDestination | StowDestination,
             deidentify: bool = False) -> DeliveryService:
        config = RoutesConfig(
            destinations={d.name: d for d in destinations},
            routes=(Route(name="all", default=True, deidentify=deidentify,
                          destinations=tuple(d.name for d in destinations)),),
            deid_secret=SECRET)
        service = DeliveryService(config, tmp_path / f"spool{len(started)}", CLASSIFIER,
                                  GatewayMetrics(), poll_s=0.05)
        started.append(service)
        service.start()
        return service

    yield make
    for service in started:
        service.stop()


def _state(service: DeliveryService) -> str:
    return service.outbox.rows()[0].state


def test_storescp_receives_valid_srs(tmp_path: Path,
                                     services: Callable[..., DeliveryService]) -> None:
    scp = StoreScp(tmp_path / "scp", free_port())
    try:
        service = services(DimseDestination(name="pacs", host="127.0.0.1", port=scp.port,
                                            called_aet="DEST", retry=FAST))
        sources = study_with_phi(2)
        service.accept(make_group(tmp_path / "g", sources))
        wait_for(lambda: _state(service) == DELIVERED)
        received = scp.files()
        assert len(received) == 2
        for path in received:
            sr = pydicom.dcmread(path)
            assert sr.SOPClassUID == SR_CLASS
            assert sr.StudyInstanceUID == sources[0].StudyInstanceUID  # no de-id on this route
            assert dciodvfy_file(path) == []
    finally:
        scp.stop()


def test_storescp_receives_valid_segs(tmp_path: Path) -> None:
    scp = StoreScp(tmp_path / "scp", free_port())
    config = RoutesConfig(destinations={"pacs": DimseDestination(
        name="pacs", host="127.0.0.1", port=scp.port, called_aet="DEST", retry=FAST)},
        routes=(Route(name="all", default=True, destinations=("pacs",)),))
    service = DeliveryService(config, tmp_path / "spool", SEGMENTER, GatewayMetrics(),
                              poll_s=0.05)
    service.start()
    try:
        sources = study_with_phi(2)
        service.accept(make_group(tmp_path / "g", sources, manifest=SEGMENTER))
        wait_for(lambda: _state(service) == DELIVERED)
        received = [pydicom.dcmread(p) for p in scp.files()]
        assert sorted(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                      .ReferencedSOPInstanceUID for seg in received) == sorted(
                          ds.SOPInstanceUID for ds in sources)
        for path in scp.files():
            assert pydicom.dcmread(path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
            assert dciodvfy_file(path) == []
    finally:
        service.stop()
        scp.stop()


def test_destination_down_then_up_retries_then_delivers(
        tmp_path: Path, services: Callable[..., DeliveryService]) -> None:
    port = free_port()
    service = services(DimseDestination(name="pacs", host="127.0.0.1", port=port,
                                        called_aet="DEST", timeout_s=2, retry=FAST))
    service.accept(make_group(tmp_path / "g", study_with_phi(1)))
    wait_for(lambda: service.outbox.rows()[0].attempts >= 3)  # refused, backing off
    row = service.outbox.rows()[0]
    assert (row.state, row.reason) == (PENDING, "association_failed")
    scp = StoreScp(tmp_path / "scp", port)
    try:
        wait_for(lambda: _state(service) == DELIVERED)
        (path,) = scp.files()
        assert dciodvfy_file(path) == []
    finally:
        scp.stop()


def test_storescp_without_the_sr_sop_class_is_dead_lettered(
        tmp_path: Path, services: Callable[..., DeliveryService]) -> None:
    cfg = tmp_path / "images-only.cfg"
    cfg.write_text(IMAGES_ONLY)
    scp = StoreScp(tmp_path / "scp", free_port(), "-xf", str(cfg), "CTOnly")
    try:
        service = services(DimseDestination(name="pacs", host="127.0.0.1", port=scp.port,
                                            called_aet="DEST", retry=FAST))
        service.accept(make_group(tmp_path / "g", study_with_phi(1)))
        wait_for(lambda: _state(service) == DEAD)
        row = service.outbox.rows()[0]
        assert (row.reason, row.attempts) == ("sop_class_not_accepted", 1)
        assert scp.files() == []
        assert all((service.outbox.folder / row.folder / f).is_file() for f in row.files)
    finally:
        scp.stop()


def _openssl_pair(folder: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl missing: scripts/dev.sh setup (as root)")
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


def test_storescp_over_mutual_dicom_tls(tmp_path: Path,
                                        services: Callable[..., DeliveryService]) -> None:
    from services.gateway.delivery.routing import Tls

    server_key, server_cert = _openssl_pair(tmp_path, "pacs.test")
    client_key, client_cert = _openssl_pair(tmp_path, "gateway.test")
    scp = StoreScp(tmp_path / "scp", free_port(), "+tls", str(server_key), str(server_cert),
                   "+cf", str(client_cert), "-rc")  # requires and verifies our certificate
    try:
        tls = Tls(ca=server_cert, cert=client_cert, key=client_key, server_name="pacs.test")
        service = services(DimseDestination(name="pacs", host="127.0.0.1", port=scp.port,
                                            called_aet="DEST", tls=tls, retry=FAST))
        service.accept(make_group(tmp_path / "g", study_with_phi(1)))
        wait_for(lambda: _state(service) == DELIVERED)
        (path,) = scp.files()
        assert dciodvfy_file(path) == []
        # Without a client certificate the same storescp refuses the association: retried.
        anonymous = services(DimseDestination(
            name="pacs", host="127.0.0.1", port=scp.port, called_aet="DEST", timeout_s=2,
            tls=Tls(ca=server_cert, server_name="pacs.test"), retry=FAST))
        anonymous.accept(make_group(tmp_path / "g2", study_with_phi(1)))
        wait_for(lambda: anonymous.outbox.rows()[0].attempts >= 2)
        assert _state(anonymous) == PENDING
        assert len(scp.files()) == 1
    finally:
        scp.stop()


@pytest.fixture()
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


def test_orthanc_stow_rs_receives_deidentified_srs_that_reidentify(
        tmp_path: Path, orthanc: OrthancServer,
        services: Callable[..., DeliveryService]) -> None:
    from services.gateway.security.deid import Deidentifier, UidMap

    service = services(StowDestination(name="research", url=f"{orthanc.url}/dicom-web/studies",
                                       retry=FAST), deidentify=True)
    sources = study_with_phi(2)
    service.accept(make_group(tmp_path / "g", sources))
    wait_for(lambda: _state(service) == DELIVERED)
    assert orthanc.find_study(sources[0].StudyInstanceUID) is None  # the original never left
    uids = UidMap(service.outbox.path.parent / "deid_uids.sqlite3", SECRET)
    study = orthanc.find_study(uids.replace(sources[0].StudyInstanceUID))
    assert study is not None
    instances = orthanc.get(f"/studies/{study}/instances")
    assert len(instances) == 2
    deid = Deidentifier(uids)
    back_refs = set()
    for k, item in enumerate(instances):
        data = httpx.get(f"{orthanc.url}/instances/{item['ID']}/file", timeout=30).content
        for value in [*PHI.values(), *(ds.SOPInstanceUID for ds in sources)]:
            assert value.encode() not in data
        path = tmp_path / f"stored{k}.dcm"
        path.write_bytes(data)
        # The basic profile empties Patient ID, Study ID, Date and Time (Type 2): dciodvfy
        # then warns that a DICOMDIR could not be built from them, and that is all it says.
        problems = {p.rsplit(" - ", 1)[-1] if DICOMDIR in p else p for p in dciodvfy_file(path)}
        assert problems <= EMPTIED, problems
        back = deid.reidentify(pydicom.dcmread(path), sources[0])
        assert back.StudyInstanceUID == sources[0].StudyInstanceUID
        series = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
        back_refs.add(series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    assert back_refs == {ds.SOPInstanceUID for ds in sources}


def test_orthanc_refusing_the_study_is_dead_lettered(
        tmp_path: Path, orthanc: OrthancServer,
        services: Callable[..., DeliveryService]) -> None:
    # STOW-RS to another study's URL: the server refuses the instances (PS3.18 10.5).
    url = f"{orthanc.url}/dicom-web/studies/1.2.826.0.1.3680043.99.1"
    service = services(StowDestination(name="research", url=url, retry=FAST))
    service.accept(make_group(tmp_path / "g", study_with_phi(1)))
    wait_for(lambda: _state(service) != PENDING or service.outbox.rows()[0].attempts > 3)
    row = service.outbox.rows()[0]
    assert (row.state, row.attempts) == (DEAD, 1), row
    assert row.reason is not None and row.reason.startswith("http_4"), row.reason


def test_gateway_with_fake_triton_delivers_to_storescp_and_marks_jobs_delivered(
        tmp_path: Path) -> None:
    """The wiring: `routes_file` -> outbox as the worker's sink -> storescp; DIMSE in from a
    calling AE the route matches; the job table ends `delivered`. Triton is faked here (the
    delivery side is what is under test); the peers are real."""
    from pynetdicom import AE, StoragePresentationContexts

    from services.gateway.store.jobs import DELIVERED as JOB_DELIVERED
    from tests.gateway.harness import fake_gateway

    scp = StoreScp(tmp_path / "scp", free_port())
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"""
destinations:
  pacs: {{type: dimse, host: 127.0.0.1, port: {scp.port}, called_aet: DEST,
         retry: {{base_s: 0.1, cap_s: 0.5}}}}
routes:
  - {{name: ct, calling_aets: [CT1], destinations: [pacs]}}
""")
    gateway = fake_gateway(tmp_path / "gw", routes_file=routes, group_level="instance")
    try:
        ae = AE(ae_title="CT1")
        ae.requested_contexts = StoragePresentationContexts[:100]
        assoc = ae.associate("127.0.0.1", gateway.config.dicom_port, ae_title="BEDSIDE")
        assert assoc.is_established
        study = study_with_phi(2)
        try:
            assert [assoc.send_c_store(ds).Status for ds in study] == [0, 0]
        finally:
            assoc.release()
        jobs = gateway.worker.jobs
        wait_for(lambda: jobs.count(JOB_DELIVERED) == 2)
        received = [pydicom.dcmread(p) for p in scp.files()]
        assert len(received) == 2
        assert {sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                .ReferencedSOPSequence[0].ReferencedSOPInstanceUID for sr in received} == {
                    ds.SOPInstanceUID for ds in study}
        sample = gateway.metrics.registry.get_sample_value
        assert sample("bedside_gateway_deliveries_total",
                      {"destination": "pacs", "outcome": "delivered"}) == 2
        assert sample("bedside_gateway_outbox_depth", {"destination": "pacs"}) == 0
    finally:
        gateway.stop()
        scp.stop()


def test_real_triton_gateway_killed_while_destination_down_delivers_each_sr_once(
        optimized: Path, tmp_path: Path) -> None:
    """Nothing faked: storescu (calling AE CT1) -> `bedside gateway --routes` -> real Triton;
    the destination (storescp) is down, the gateway is SIGKILLed with results in its outbox,
    the destination comes up, the gateway restarts on the same spool: every instance's SR
    arrives exactly once, valid per dciodvfy, and the job table ends `delivered`."""
    import signal
    import sqlite3
    import sys

    from services.gateway.delivery.outbox import Outbox
    from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
    from tests.conftest import TINY_MANIFEST, triton_env
    from tests.gateway.util import make_study

    port = free_port()
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"""
destinations:
  pacs: {{type: dimse, host: 127.0.0.1, port: {port}, called_aet: DEST, timeout_s: 5,
         retry: {{base_s: 0.2, cap_s: 0.5}}}}
routes:
  - {{name: ct, calling_aets: [CT1], destinations: [pacs]}}
""")
    spool = tmp_path / "spool"
    files = []
    for k, ds in enumerate(make_study(3, seed=20)):
        path = tmp_path / f"in{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    bedside = Path(sys.executable).with_name("bedside")
    triton = TritonServer(TritonInstall.discover(triton_env()), optimized / "repository",
                          tmp_path / "triton", TritonPorts(free_port(), free_port(),
                                                           free_port()))
    triton.start()

    def gateway() -> tuple[subprocess.Popen[bytes], int]:
        http, dicom = free_port(), free_port()
        with (tmp_path / "gateway.log").open("ab") as log:
            proc = subprocess.Popen(
                [str(bedside), "gateway", "--repository", str(optimized / "repository"),
                 "--model", TINY_MANIFEST.name, "--spool", str(spool), "--http-port",
                 str(http), "--dicom-port", str(dicom), "--grpc-port", "0", "--triton-url",
                 f"127.0.0.1:{triton.ports.grpc}", "--no-auth", "--plaintext",
                 "--group-level", "instance", "--routes", str(routes)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: proc.poll() is not None or _healthy(http), 60)
        assert proc.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
        return proc, dicom

    scp = None
    proc, dicom = gateway()
    try:
        sent = subprocess.run(["/usr/bin/storescu", "-aet", "CT1", "-aec", "BEDSIDE",
                               "127.0.0.1", str(dicom), *files], capture_output=True,
                              text=True, timeout=60, env=dict(os.environ, TCP_NODELAY="1"))
        assert sent.returncode == 0, sent.stderr

        def retrying() -> bool:
            if not (spool / Outbox.FILE).exists():
                return False
            with sqlite3.connect(spool / Outbox.FILE) as db:
                rows = db.execute("SELECT attempts FROM outbox WHERE state = 'pending'")
                attempts = [a for (a,) in rows]
            return len(attempts) == 3 and min(attempts) >= 1

        wait_for(retrying, 60)  # all three in the outbox, the destination refusing
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

        scp = StoreScp(tmp_path / "scp", port)
        proc, dicom = gateway()
        wait_for(lambda: len(scp.files()) >= 3, 60)
        wait_for(lambda: _job_states(spool) == ["delivered"] * 3, 30)
        time.sleep(1.0)  # a duplicate, if any were sent, would arrive now
        received = scp.files()
        assert len(received) == 3
        srs = [pydicom.dcmread(p) for p in received]
        assert len({sr.SOPInstanceUID for sr in srs}) == 3
        refs = {sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                .ReferencedSOPSequence[0].ReferencedSOPInstanceUID for sr in srs}
        assert refs == {pydicom.dcmread(f).SOPInstanceUID for f in files}
        for path in received:
            assert dciodvfy_file(path) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        if scp is not None:
            scp.stop()
        triton.stop()


def _healthy(http_port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _job_states(spool: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(spool / "jobs.sqlite3") as db:
        return [s for (s,) in db.execute("SELECT state FROM jobs ORDER BY name")]



class AuthOrthanc(OrthancServer):
    """Orthanc with HTTP basic authentication. (Debian's Orthanc 1.10.1 crashes at the first
    HTTPS request here, so STOW-RS over TLS is not tested against it.)"""

    def __init__(self, work: Path, user: str, password: str) -> None:
        super().__init__(work, extra={"AuthenticationEnabled": True,
                                      "RegisteredUsers": {user: password}})
        self._userinfo = f"{user}:{password}@"

    @property
    def url(self) -> str:  # the launcher's own checks authenticate through the URL
        return f"http://{self._userinfo}127.0.0.1:{self.http_port}"


def test_orthanc_stow_rs_with_basic_auth(tmp_path: Path,
                                         services: Callable[..., DeliveryService]) -> None:
    from services.gateway.delivery.routing import parse_routes

    (tmp_path / "auth").write_text("bedside:s3cret pass\n")
    with AuthOrthanc(tmp_path / "orthanc", "bedside", "s3cret pass") as orthanc:
        url = f"http://127.0.0.1:{orthanc.http_port}/dicom-web/studies"
        config = parse_routes({
            "destinations": {
                "good": {"type": "stowrs", "url": url, "basic_auth_file": "auth"},
                "noauth": {"type": "stowrs", "url": url, "retry": {"base_s": 0.1,
                                                                    "cap_s": 0.2}}},
            "routes": [{"name": "all", "default": True, "destinations": ["good"]}]}, tmp_path)
        good = services(config.destinations["good"])
        sources = study_with_phi(1)
        good.accept(make_group(tmp_path / "g", sources))
        wait_for(lambda: _state(good) == DELIVERED)
        assert orthanc.find_study(sources[0].StudyInstanceUID) is not None

        noauth = services(config.destinations["noauth"])  # 401: retried, credentials fixable
        other = study_with_phi(1, seed=5)
        noauth.accept(make_group(tmp_path / "h", other))
        wait_for(lambda: noauth.outbox.rows()[0].attempts >= 2)
        row = noauth.outbox.rows()[0]
        assert (row.state, row.reason) == (PENDING, "http_401")
        assert orthanc.find_study(other[0].StudyInstanceUID) is None
