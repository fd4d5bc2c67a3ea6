"""Security with real peers: ``bedside gateway`` (subprocess, the real CLI) in front of the real
bundled Triton, with API keys, TLS on every listener (a throwaway openssl CA, client
certificates) and the audit trail; called by httpx, dicomweb-client (STOW-RS), stock
tritonclient.grpc and dcmtk echoscu over DICOM TLS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from dicomweb_client.api import DICOMwebClient
from tritonclient.utils import InferenceServerException

from services.gateway.phi import uid_hash
from services.gateway.security.auth import hash_key, new_key, normalize_subject
from services.net import free_port
from services.triton.launcher import TritonInstall, TritonPorts, TritonServer
from tests.conftest import TINY_MANIFEST, triton_env
from tests.gateway.pki import client_context, issue, make_pki, served_certificate
from tests.gateway.util import dicom_bytes, make_instance, make_study
from tests.integration.test_end_to_end import _expected_score

pytestmark = pytest.mark.integration
MODEL = TINY_MANIFEST.name
DICOM = {"Content-Type": "application/dicom"}


@dataclass
class Stack:
    http: str  # https://localhost:port
    grpc: str  # localhost:port
    dicom_port: int
    pki: Path
    keys_file: Path
    audit: Path
    keys: dict[str, str]


def _write_keys(path: Path, entries: list[dict[str, object]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    os.replace(tmp, path)


def _entries(keys: dict[str, str]) -> list[dict[str, object]]:
    return [
        {"name": "ris", "sha256": hash_key(keys["ris"]), "scopes": ["infer", "submit", "read"]},
        {"name": "viewer", "sha256": hash_key(keys["viewer"]), "scopes": ["read"]},
        {"name": "limited", "sha256": hash_key(keys["limited"]), "scopes": ["read"],
         "rate_per_s": 0.05, "burst": 1},
        {"name": "radiology-app", "subject": "CN=client,O=Radiology", "scopes": ["infer"]},
    ]


@pytest.fixture(scope="module")
def stack(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("security")
    pki = make_pki(work / "pki")
    keys = {"ris": new_key(), "viewer": new_key(), "limited": new_key()}
    keys_file = work / "keys.json"
    _write_keys(keys_file, _entries(keys))
    audit = work / "audit.jsonl"
    triton = TritonServer(TritonInstall.discover(triton_env()), optimized / "repository",
                          work / "triton", TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    http_port, grpc_port, dicom_port = free_port(), free_port(), free_port()
    log = work / "gateway.log"
    bedside = Path(sys.executable).with_name("bedside")
    proc = None
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(bedside), "gateway", "--repository", str(optimized / "repository"),
                 "--model", MODEL, "--spool", str(work / "spool"), "--triton-url",
                 triton.grpc_url, "--http-port", str(http_port), "--grpc-port",
                 str(grpc_port), "--dicom-port", str(dicom_port), "--allowed-ae", "TESTSCU",
                 "--api-keys", str(keys_file), "--tls-cert", str(pki / "server.pem"),
                 "--tls-key", str(pki / "server.key"), "--tls-ca", str(pki / "ca.pem"),
                 "--audit-log", str(audit), "--min-free-bytes", "0"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"https://localhost:{http_port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("gateway did not start: " + log.read_text()[-3000:])
            try:
                if httpx.get(f"{url}/readyz", verify=client_context(pki, False),
                             timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield Stack(url, f"localhost:{grpc_port}", dicom_port, pki, keys_file, audit, keys)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        triton.stop()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _records(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stack.audit.read_text().splitlines()]


def test_rest_needs_a_key_with_the_right_scope_through_real_triton(
        stack: Stack, optimized: Path) -> None:
    ds = make_instance(300)
    ds.PatientName = "Roe^Richard"
    body = dicom_bytes(ds)
    with httpx.Client(base_url=stack.http, verify=client_context(stack.pki, False),
                      timeout=30) as c:
        assert c.post("/v1/infer", content=body, headers=DICOM).status_code == 401
        assert c.post("/v1/infer", content=body,
                      headers={**DICOM, **_bearer(stack.keys["viewer"])}).status_code == 403
        ok = c.post("/v1/infer", content=body, headers={**DICOM, **_bearer(stack.keys["ris"])})
        assert ok.status_code == 200
        score = ok.json()["findings"][0]["score"]
        assert score == pytest.approx(_expected_score(optimized, ds), abs=1e-4)
    sop = uid_hash(str(ds.SOPInstanceUID))
    mine = [r for r in _records(stack) if r["action"] == "infer" and r["protocol"] == "rest"]
    assert [(r["outcome"], r["status"]) for r in mine[-3:]] == [
        ("no_credentials", 401), ("scope", 403), ("ok", 200)]
    assert mine[-1]["principal"] == "key:ris" and mine[-1]["instance"] == [sop]


def test_stow_rs_with_dicomweb_client_and_an_api_key_through_real_triton(stack: Stack) -> None:
    instances = make_study(2, seed=310)
    session = requests.Session()
    session.verify = str(stack.pki / "ca.pem")
    session.trust_env = False  # else $REQUESTS_CA_BUNDLE replaces session.verify
    anonymous = DICOMwebClient(url=f"{stack.http}/dicomweb", session=session)
    with pytest.raises(requests.HTTPError) as refused:
        anonymous.store_instances(instances)
    assert refused.value.response is not None and refused.value.response.status_code == 401
    keyed = DICOMwebClient(url=f"{stack.http}/dicomweb", session=session,
                           headers=_bearer(stack.keys["ris"]))
    response = keyed.store_instances(instances)
    session.close()  # an idle TLS keep-alive connection would hold up the gateway's stop
    assert len(response[0x00081199].value) == 2
    stow = [r for r in _records(stack) if r["protocol"] == "stow"][-1]
    assert stow["principal"] == "key:ris" and stow["outcome"] == "ok"
    assert set(stow["instance"]) == {uid_hash(str(d.SOPInstanceUID))
                                     for d in instances}


def _grpc_client(stack: Stack) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        stack.grpc, ssl=True, root_certificates=str(stack.pki / "ca.pem"),
        private_key=str(stack.pki / "client.key"),
        certificate_chain=str(stack.pki / "client.pem"))


def test_tritonclient_grpc_over_mutual_tls_with_keys_and_limits_through_real_triton(
        stack: Stack, optimized: Path) -> None:
    client = _grpc_client(stack)
    ds = make_instance(320)
    tensor = grpcclient.InferInput("DICOM", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([dicom_bytes(ds)], dtype=np.object_))
    # the client certificate is a principal of its own (scope infer)...
    scores = client.infer(MODEL, [tensor]).as_numpy("SCORES")
    assert scores[0, 0] == pytest.approx(_expected_score(optimized, ds), abs=1e-4)
    # ...an API key in the metadata takes precedence over it
    with pytest.raises(InferenceServerException) as denied:
        client.infer(MODEL, [tensor], headers={"authorization": f"Bearer {stack.keys['viewer']}"})
    assert denied.value.status() == "StatusCode.PERMISSION_DENIED"
    with pytest.raises(InferenceServerException) as unknown:
        client.infer(MODEL, [tensor], headers={"x-api-key": "bsk_not-a-key"})
    assert unknown.value.status() == "StatusCode.UNAUTHENTICATED"
    limited = {"x-api-key": stack.keys["limited"]}
    assert client.get_model_metadata(MODEL, headers=limited).name == MODEL
    with pytest.raises(InferenceServerException) as exhausted:
        client.get_model_metadata(MODEL, headers=limited)
    assert exhausted.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    client.close()
    grpc_records = [r for r in _records(stack) if r["protocol"] == "oip_grpc"]
    assert [(r["principal"], r["outcome"]) for r in grpc_records[-5:]] == [
        ("cert:radiology-app", "ok"), ("key:viewer", "scope"), (None, "bad_key"),
        ("key:limited", "ok"), ("key:limited", "rate_limited")]


def test_dicom_tls_echo_with_a_client_certificate_is_audited(stack: Stack) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    base = ["/usr/bin/echoscu", "-aet", "TESTSCU", "-aec", "BEDSIDE"]
    tls = ["+tls", str(stack.pki / "client.key"), str(stack.pki / "client.pem"),
           "+cf", str(stack.pki / "ca.pem")]
    ok = subprocess.run([*base, *tls, "localhost", str(stack.dicom_port)], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    plain = subprocess.run([*base, "localhost", str(stack.dicom_port)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0, "a plain-text association must not get through"
    assoc = [r for r in _records(stack) if r["event"] == "association"]
    assert assoc[-1]["principal"] == "ae:TESTSCU" and assoc[-1]["outcome"] == "ok"
    assert assoc[-1]["tls"] is True
    assert normalize_subject(assoc[-1]["client_subject"]) == "CN=client,O=Radiology"


def test_key_rotation_and_certificate_renewal_without_restart(stack: Stack) -> None:
    verify = client_context(stack.pki, False)
    before = served_certificate("localhost", int(stack.http.rsplit(":", 1)[1]), stack.pki)
    rotated = new_key()
    keys = {**stack.keys, "ris": rotated}
    _write_keys(stack.keys_file, _entries(keys))
    issue(stack.pki, "server", "/CN=server-renewed")
    time.sleep(1.3)
    with httpx.Client(base_url=stack.http, verify=verify, timeout=30) as c:
        assert c.get("/v2", headers=_bearer(stack.keys["ris"])).status_code == 401
        assert c.get("/v2", headers=_bearer(rotated)).status_code == 200
    after = served_certificate("localhost", int(stack.http.rsplit(":", 1)[1]), stack.pki)
    assert after != before
    stack.keys["ris"] = rotated


def test_the_audit_trail_has_no_raw_uids_names_or_keys(stack: Stack) -> None:
    text = stack.audit.read_text()
    records = _records(stack)
    assert records and all({"time", "event", "protocol", "principal", "source", "action",
                            "outcome"} <= set(r) for r in records)
    for secret in ("Roe", "Richard", *stack.keys.values()):
        assert secret not in text
    # UIDs are 1.2.826... / 2.25... dotted numbers: none may appear raw
    import re

    assert not re.search(r"\b\d+(\.\d+){4,}\b", text)
