"""No patient data in what the gateway writes about its traffic.

The whole stack runs for real: the bundled Triton, ``bedside -v gateway`` (DEBUG logging) as
a subprocess with API keys, an AE allowlist and an audit log. Studies with distinctive fake
patient names, ids, birth dates, institutions, accession numbers and UIDs go in over DIMSE
(dcmtk storescu), STOW-RS (dicomweb-client), REST (/v1/infer, /v1/studies) and OIP v2 (gRPC
and HTTP, tritonclient), with error cases on every edge: garbage, truncated files, no pixel data, a
non-image SOP class, an oversized request, an unknown calling AE, missing and wrong keys, and
JPEG lossless / 12-bit extended instances (GDCM) including one whose stream makes GDCM abort.
Then every line of the gateway's and Triton's output, the /metrics text and the audit log is
scanned: no PHI value and no raw UID may appear, and the hashed UIDs must (so the scan is
known to see the traffic); nor may the API keys used. The result store legitimately keeps
UIDs and is not scanned. Every inferred group is also built into an SR (highdicom) and
delivered over C-STORE to a real dcmtk storescp, so the result-building and delivery paths are
scanned too.

Supersedes nothing: tests/gateway/test_dimse.py keeps its in-process, DIMSE-only check.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import UID
from tritonclient.utils import InferenceServerException

from loadtests.stack import GatewayProcess
from services.gateway.phi import uid_hash
from services.gateway.security.auth import hash_key, new_key
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env
from tests.gateway.util import make_instance
from tests.integration.test_delivery_peers import StoreScp
from tests.optimizer.contract.test_preprocess_gdcm import ABORTS_GDCM
from tests.optimizer.pixel_data import dcmcjpeg

pytestmark = pytest.mark.integration
MODEL = TINY_MANIFEST.name
STORESCU = "/usr/bin/storescu"
UID_ROOT = "1.2.826.0.1.3680043.10.999."
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")


@dataclass
class Phi:
    """Distinctive fake patient data, one set per protocol so that a leak names its edge."""

    tag: str
    names: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)

    def instance(self, seed: int, study: str, series: str, k: int) -> Dataset:
        ds = make_instance(seed, size=64)
        token = f"{self.tag}{k}"
        ds.PatientName = f"Zyxwvutsrq{self.tag}^Qwertyuiop{token}"
        ds.PatientID = f"PIDX-{secrets.token_hex(4)}-{token}"
        ds.PatientBirthDate = "1907" + f"{(seed % 12) + 1:02d}" + "13"
        ds.InstitutionName = f"Saint Xanthippe {token} Hospital"
        ds.AccessionNumber = f"ACCX{secrets.token_hex(3)}"
        ds.ReferringPhysicianName = f"Referrer^Quetzalcoatl{token}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(self.uid())
        self.names += [str(ds.PatientName).split("^")[0], str(ds.PatientName).split("^")[1],
                       str(ds.ReferringPhysicianName).split("^")[1]]
        self.values += [ds.PatientID, ds.PatientBirthDate, ds.InstitutionName,
                        ds.AccessionNumber]
        self.uids += [study, series, str(ds.SOPInstanceUID)]
        return ds

    def uid(self) -> str:
        return f"{UID_ROOT}{secrets.randbelow(10**12)}.{secrets.randbelow(10**9)}"

    def study(self, n: int, seed: int) -> list[Dataset]:
        study, series = self.uid(), self.uid()
        return [self.instance(seed + k, study, series, k) for k in range(n)]

    def secrets(self) -> set[str]:
        return set(self.names) | set(self.values) | set(self.uids)


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _no_pixels(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds


def _sr(ds: Dataset) -> Dataset:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    return ds


class Stack:
    def __init__(self, repository: Path, work: Path) -> None:
        self.work = work
        self.key = new_key()
        keys = work / "keys.json"
        keys.write_text(json.dumps({"keys": [{
            "name": "phi-test", "sha256": hash_key(self.key),
            "scopes": ["infer", "submit", "read", "metrics"]}]}))
        self.triton = TritonServer(TritonInstall.discover(triton_env()), repository,
                                   work / "triton", TritonPorts(free_port(), free_port(),
                                                                free_port()))
        self.triton.start()
        self.log = work / "gateway.log"
        self.audit = work / "audit.jsonl"
        # Every inferred group becomes an SR (built by highdicom) delivered by C-STORE to a
        # real storescp: the result-building and delivery paths log at DEBUG too.
        routes = work / "routes.yaml"
        self.pacs: StoreScp | None = None
        try:
            self.pacs = StoreScp(work / "pacs", free_port())
            routes.write_text(f"""
destinations:
  pacs: {{type: dimse, host: 127.0.0.1, port: {self.pacs.port}, called_aet: DEST,
         timeout_s: 10, retry: {{base_s: 0.2, cap_s: 0.5}}}}
routes:
  - {{name: all, default: true, destinations: [pacs]}}
""")
            self.gateway = GatewayProcess(
                repository, MODEL, work / "spool", self.triton.grpc_url, self.log,
                "--allowed-ae", "TESTSCU", "--audit-log", str(self.audit), "--min-free-bytes",
                "0", "--routes", str(routes),
                security=("--api-keys", str(keys), "--plaintext"), grpc=True,
                verbose=True, ready_path="/readyz")
        except BaseException:
            if self.pacs is not None:
                self.pacs.stop()
            self.triton.stop()
            raise
        self.proc = self.gateway.proc
        self.http_port, self.dicom_port = self.gateway.http_port, self.gateway.dicom_port
        self.grpc_port = self.gateway.grpc_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def stop(self) -> None:
        self.gateway.terminate()
        self.triton.stop()
        if self.pacs is not None:
            self.pacs.stop()

    def storescu(self, calling: str, files: list[Path]) -> str:
        proc = subprocess.run(
            [STORESCU, "-v", "-aet", calling, "-aec", "BEDSIDE", "127.0.0.1",
             str(self.dicom_port), *map(str, files)],
            capture_output=True, text=True, timeout=120, check=False,
            env=dict(os.environ, TCP_NODELAY="1"))
        return proc.stdout + proc.stderr

    def wait_done(self, study: str) -> list[dict[str, object]]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = httpx.get(f"{self.url}/v1/studies/{study}/results", headers=self.headers)
            if r.status_code == 200 and r.json()["status"] == "done":
                return list(r.json()["instances"])
            time.sleep(0.1)
        raise AssertionError("study not done in 60 s")


@pytest.fixture(scope="module")
def stack(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not os.access(STORESCU, os.X_OK):
        pytest.fail(f"{STORESCU} missing: install Debian dcmtk (scripts/dev.sh setup as root)")
    s = Stack(optimized / "repository", tmp_path_factory.mktemp("phi"))
    try:
        yield s
    finally:
        s.stop()


def _dimse(stack: Stack, phi: Phi) -> list[str]:
    folder = stack.work / "dimse"
    folder.mkdir()
    good = phi.study(2, seed=500)
    bad = [_no_pixels(phi.study(1, seed=510)[0]), _sr(phi.study(1, seed=520)[0])]
    files = []
    for k, ds in enumerate(good + bad):
        files.append(folder / f"{k}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    out = stack.storescu("TESTSCU", files)
    assert out.count("Received Store Response (Success)") == 2, out
    stranger = stack.storescu("STRANGER", files[:1])  # not on the allowlist
    assert "Received Store Response" not in stranger, stranger
    stack.wait_done(str(good[0].StudyInstanceUID))
    return [str(ds.SOPInstanceUID) for ds in good]


def _stow(stack: Stack, phi: Phi) -> list[str]:
    good = phi.study(2, seed=600)
    client = DICOMwebClient(url=f"{stack.url}/dicomweb", headers=stack.headers)
    client.store_instances(good)
    # one request: a valid instance, one without pixel data and a garbage part
    mixed = phi.study(2, seed=610)
    boundary = "phi-boundary"
    parts = [_bytes(mixed[0]), _bytes(_no_pixels(mixed[1])), b"not DICOM at all"]
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + p + b"\r\n" for p in parts) + b"--" + boundary.encode() + b"--"
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    r = httpx.post(f"{stack.url}/dicomweb/studies", content=body,
                   headers={**stack.headers, "Content-Type": ctype}, timeout=30)
    assert r.status_code in (200, 202, 409), r.text
    # no key, a wrong key
    for headers in ({}, {"Authorization": "Bearer bsk_wrong"}):
        r = httpx.post(f"{stack.url}/dicomweb/studies", content=body,
                       headers={**headers, "Content-Type": ctype}, timeout=30)
        assert r.status_code in (401, 403), r.status_code
    stack.wait_done(str(good[0].StudyInstanceUID))
    return [str(ds.SOPInstanceUID) for ds in good]


def _rest(stack: Stack, phi: Phi) -> list[str]:
    dicom = {**stack.headers, "Content-Type": "application/dicom"}
    good = phi.study(1, seed=700)[0]
    r = httpx.post(f"{stack.url}/v1/infer", content=_bytes(good), headers=dicom, timeout=30)
    assert r.status_code == 200, r.text
    whole = _bytes(phi.study(1, seed=701)[0])
    errors = {
        "truncated": whole[: len(whole) // 2],
        "no pixels": _bytes(_no_pixels(phi.study(1, seed=702)[0])),
        "SR": _bytes(_sr(phi.study(1, seed=703)[0])),
        "garbage": b"\x00garbage " * 50,
        # oversized: a PHI header in front of more than the 64 MiB request limit
        "oversized": whole + bytes(64 * 1024 * 1024),
    }
    for what, body in errors.items():
        r = httpx.post(f"{stack.url}/v1/infer", content=body, headers=dicom, timeout=60)
        assert 400 <= r.status_code < 500, (what, r.status_code)
    r = httpx.post(f"{stack.url}/v1/infer", content=_bytes(good),
                   headers={"Content-Type": "application/dicom"}, timeout=30)
    assert r.status_code == 401
    # JPEG lossless SV1 and 12-bit extended (GDCM, in its helper process), and a JPEG lossless
    # stream that makes GDCM abort its process, behind a PHI header
    folder = stack.work / "rest-jpeg"
    folder.mkdir()
    for k, process in enumerate(("+e1", "+ee")):
        sent = dcmcjpeg(phi.study(1, seed=730 + k)[0], folder / f"{k}.dcm", process)
        phi.uids.append(str(sent.SOPInstanceUID))  # lossy: a new UID from dcmcjpeg
        r = httpx.post(f"{stack.url}/v1/infer", content=(folder / f"{k}.dcm").read_bytes(),
                       headers=dicom, timeout=30)
        assert r.status_code == 200, r.text
    aborts = pydicom.dcmread(ABORTS_GDCM)
    for element in phi.study(1, seed=740)[0].iterall():
        if element.tag.group in (0x0008, 0x0010, 0x0020) and element.tag != 0x00080016:
            aborts[element.tag] = element  # patient, study, series and instance attributes
    aborts.file_meta.MediaStorageSOPInstanceUID = aborts.SOPInstanceUID
    r = httpx.post(f"{stack.url}/v1/infer", content=_bytes(aborts), headers=dicom, timeout=30)
    assert (r.status_code, r.json()["error"]["reason"]) == (400, "bad_pixels"), r.text
    # the JSON study API: one good study, one refused as a whole (an instance without pixels)
    studies = f"{stack.url}/v1/studies"
    good_study = phi.study(2, seed=710)
    r = httpx.post(studies, headers=stack.headers, timeout=30, json={
        "instances": [base64.b64encode(_bytes(ds)).decode() for ds in good_study]})
    assert r.status_code == 202, r.text
    bad_study = phi.study(2, seed=720)
    r = httpx.post(studies, headers=stack.headers, timeout=30, json={"instances": [
        base64.b64encode(_bytes(bad_study[0])).decode(),
        base64.b64encode(_bytes(_no_pixels(bad_study[1]))).decode()]})
    assert r.status_code in (400, 422), r.text
    r = httpx.post(studies, headers=stack.headers, timeout=30,
                   json={"instances": ["not base64!"]})
    assert r.status_code == 400
    stack.wait_done(str(good_study[0].StudyInstanceUID))
    return [str(good.SOPInstanceUID)] + [str(ds.SOPInstanceUID) for ds in good_study]


def _grpc(stack: Stack, phi: Phi) -> list[str]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.grpc_port}")
    try:
        good = phi.study(2, seed=800)
        tensor = grpcclient.InferInput("DICOM", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([_bytes(ds) for ds in good], dtype=np.object_))
        headers = {"authorization": f"Bearer {stack.key}"}  # gRPC metadata: lower case
        result = client.infer(MODEL, [tensor], headers=headers)
        assert result.as_numpy("SCORES").shape[0] == 2
        for blob in (_bytes(_no_pixels(phi.study(1, seed=810)[0])), b"garbage" * 10):
            bad = grpcclient.InferInput("DICOM", [1], "BYTES")
            bad.set_data_from_numpy(np.array([blob], dtype=np.object_))
            with pytest.raises(InferenceServerException):
                client.infer(MODEL, [bad], headers=headers)
        with pytest.raises(InferenceServerException):
            client.infer(MODEL, [tensor], headers={"authorization": "Bearer bsk_wrong"})
    finally:
        client.close()
    # the same over OIP REST (tritonclient.http)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{stack.http_port}")
    try:
        more = phi.study(1, seed=820)
        tensor = httpclient.InferInput("DICOM", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([_bytes(more[0])], dtype=np.object_))
        assert http.infer(MODEL, [tensor], headers=stack.headers).as_numpy("SCORES").size
        bad = httpclient.InferInput("DICOM", [1], "BYTES")
        bad.set_data_from_numpy(np.array([_bytes(_sr(phi.study(1, seed=830)[0]))],
                                         dtype=np.object_))
        with pytest.raises(InferenceServerException):
            http.infer(MODEL, [bad], headers=stack.headers)
    finally:
        http.close()
    return [str(ds.SOPInstanceUID) for ds in good + more]


def test_no_phi_in_logs_metrics_or_audit_across_every_edge(stack: Stack) -> None:
    phis = {name: Phi(name[:2].upper()) for name in ("dimse", "stow", "rest", "grpc")}
    inferred = {"dimse": _dimse(stack, phis["dimse"]), "stow": _stow(stack, phis["stow"]),
                "rest": _rest(stack, phis["rest"]), "grpc": _grpc(stack, phis["grpc"])}
    assert stack.pacs is not None
    # the SRs of the acknowledged studies (DIMSE, STOW-RS, /v1/studies) reach the destination
    delivered: list[Dataset] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(delivered) < 3:
        time.sleep(0.5)
        delivered = [pydicom.dcmread(p) for p in stack.pacs.files()]
    assert len(delivered) >= 3, stack.pacs.log.read_text(errors="replace")
    assert {str(ds.Modality) for ds in delivered} == {"SR"}
    names = " ".join(str(ds.PatientName) for ds in delivered)  # from the patients' data
    assert all(any(n in names for n in phi.names) for edge, phi in phis.items()
               if edge in ("dimse", "stow")), names
    metrics = httpx.get(f"{stack.url}/metrics", headers=stack.headers, timeout=10)
    assert metrics.status_code == 200
    time.sleep(0.5)  # the last audit records and log lines are flushed
    outputs = {
        "gateway log": stack.log.read_text(errors="replace"),
        "triton log": stack.triton.log_path.read_text(errors="replace"),
        "metrics": metrics.text,
        "audit log": stack.audit.read_text(errors="replace"),
    }
    assert "DEBUG" in outputs["gateway log"]  # the most talkative level was on
    leaks = [(where, edge, secret) for edge, phi in phis.items() for secret in phi.secrets()
             for where, text in outputs.items() if secret in text]
    leaks += [(where, "any", UID_ROOT) for where, text in outputs.items() if UID_ROOT in text]
    # nor the credentials: the valid key and the wrong one that was tried
    leaks += [(where, "auth", "API key") for where, text in outputs.items()
              if stack.key in text or "bsk_wrong" in text]
    assert leaks == [], leaks
    # the scan saw the traffic: every edge's inferred instances appear, hashed
    seen = outputs["gateway log"] + outputs["audit log"]
    for edge, sops in inferred.items():
        assert all(uid_hash(uid) in seen for uid in sops), edge
    records = [json.loads(line) for line in outputs["audit log"].splitlines() if line]
    assert {"dimse", "stow", "rest", "oip_grpc", "oip_rest"} <= {
        str(r.get("protocol")) for r in records}
    assert any(r.get("outcome") not in (None, "ok", "success") for r in records)  # errors too
