"""API keys: the keys file, rotation without restart, and the guard on every REST and gRPC
edge (401/403/429/503 and UNAUTHENTICATED/PERMISSION_DENIED/RESOURCE_EXHAUSTED), each call
audited."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services.errors import ConfigError
from services.gateway.app import Gateway
from services.gateway.phi import uid_hash
from services.gateway.security.auth import KeyStore, hash_key, new_key, parse_keys
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer
from tests.gateway.harness import base_url, fake_gateway
from tests.gateway.util import dicom_bytes, make_instance

MODEL = TINY_MANIFEST.name
DICOM = {"Content-Type": "application/dicom"}


def write_keys(path: Path, entries: list[dict[str, Any]]) -> None:
    """Rewrites the file as an operator (or the kubelet) would: a new file moved into place."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    os.replace(tmp, path)


def entry(name: str, key: str, scopes: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hash_key(key), "scopes": scopes, **extra}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---- the keys file ---------------------------------------------------------------------


def test_keys_file_yaml_and_json_and_its_errors() -> None:
    key = new_key()
    yaml_text = f"keys:\n  - name: ris\n    sha256: {hash_key(key)}\n    scopes: [infer]\n"
    (parsed,) = parse_keys(yaml_text, "keys.yaml")
    assert parsed.name == "ris" and parsed.scopes == {"infer"}
    assert parsed.sha256 == hashlib.sha256(key.encode()).digest()
    bad = [
        ({"keys": [{"name": "a", "scopes": ["infer"]}]}, "exactly one of sha256"),
        ({"keys": [entry("a", "k", ["admin"])]}, "unknown scopes"),
        ({"keys": [entry("a", "k", ["read"]), entry("a", "j", ["read"])]}, "duplicate"),
        ({"keys": [{"name": "a", "sha256": "xyz", "scopes": []}]}, "64 lower-case hex"),
        ({"keys": [entry("a b", "k", ["read"])]}, "name must be"),
        ({"keys": [entry("a", "k", ["read"], rate_per_s=-1)]}, "positive"),
        ({"key": []}, "'keys' list"),
    ]
    for doc, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_keys(json.dumps(doc), "keys.json")


def test_rotation_without_restart_and_a_broken_edit_keeps_the_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    old, new = new_key(), new_key()
    write_keys(path, [entry("ris", old, ["infer"])])
    clock = Clock()
    store = KeyStore(path, clock=clock)
    assert store.by_key(old) is not None and store.by_key(new) is None
    write_keys(path, [entry("ris-2025", new, ["infer", "read"])])  # rotate: new in, old out
    assert store.by_key(old) is not None, "re-read at most once a second"
    clock.now += 1.5
    principal = store.by_key(new)
    assert principal is not None and principal.label == "key:ris-2025"
    assert store.by_key(old) is None
    path.write_text("{ not json: [")  # a botched edit
    clock.now += 1.5
    assert store.by_key(new) is not None, "previous keys stay in force"
    assert store.by_key("") is None and store.by_key(new + "x") is None


def test_keys_new_prints_a_key_once_with_a_matching_entry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.gateway.security.auth", "new", "--name", "pacs-bridge",
         "--scopes", "submit,read"], capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("bsk_"))
    item = json.loads(out.split("  - ", 1)[1])
    assert item == {"name": "pacs-bridge", "scopes": ["submit", "read"],
                    "sha256": hash_key(key)}
    assert len(key) >= 40
    refused = subprocess.run(
        [sys.executable, "-m", "services.gateway.security.auth", "new", "--name", "x",
         "--scopes", "everything"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "unknown scopes" in refused.stderr


# ---- the guard on the edges ------------------------------------------------------------


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, str]:
    return {"infer": new_key(), "reader": new_key(), "submitter": new_key(),
            "scraper": new_key()}


@pytest.fixture()
def gateway(tmp_path: Path, keys: dict[str, str]) -> Iterator[Gateway]:
    path = tmp_path / "keys.json"
    write_keys(path, [entry("infer-app", keys["infer"], ["infer"]),
                      entry("reader", keys["reader"], ["read"]),
                      entry("submitter", keys["submitter"], ["submit", "read"]),
                      entry("prometheus", keys["scraper"], ["metrics"])])
    gw = fake_gateway(tmp_path, api_keys=path, audit_log=tmp_path / "audit.jsonl")
    yield gw
    gw.stop()


def audit_records(gw: Gateway) -> list[dict[str, Any]]:
    assert gw.config.audit_log is not None
    return [json.loads(line) for line in gw.config.audit_log.read_text().splitlines()]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def refused_count(gw: Gateway, protocol: str, reason: str) -> float:
    """``bedside_gateway_requests_total`` for refusals of ``protocol`` with ``reason``."""
    value = gw.metrics.registry.get_sample_value(
        "bedside_gateway_requests_total",
        {"protocol": protocol, "outcome": "refused", "reason": reason})
    return value or 0.0


def test_refusals_by_the_guard_are_counted_by_edge_and_reason_with_fake_triton(
        gateway: Gateway, keys: dict[str, str]) -> None:
    data = dicom_bytes(make_instance(1))
    with httpx.Client(base_url=base_url(gateway), timeout=30) as c:
        assert c.post("/v1/infer", content=data, headers=DICOM).status_code == 401
        assert c.post("/v1/infer", content=data,
                      headers={**DICOM, **bearer("bsk_" + "0" * 40)}).status_code == 401
        assert c.post("/v1/infer", content=data,
                      headers={**DICOM, **bearer(keys["reader"])}).status_code == 403
        assert c.get("/v2").status_code == 401
        exposed = c.get("/metrics", headers=bearer(keys["scraper"])).text
    client = _grpc_client(gateway)
    with pytest.raises(InferenceServerException):
        client.get_server_metadata()
    client.close()
    assert refused_count(gateway, "rest", "no_credentials") == 1
    assert refused_count(gateway, "rest", "bad_key") == 1
    assert refused_count(gateway, "rest", "scope") == 1
    assert refused_count(gateway, "oip_rest", "no_credentials") == 1
    assert refused_count(gateway, "oip_grpc", "no_credentials") == 1
    assert ('bedside_gateway_requests_total{outcome="refused",protocol="rest",'
            'reason="no_credentials"} 1.0') in exposed


def test_rest_401_without_key_403_wrong_scope_200_right_scope_with_fake_triton(
        gateway: Gateway, keys: dict[str, str]) -> None:
    url = base_url(gateway)
    ds = make_instance(2)
    ds.PatientName = "Doe^Jane"
    data = dicom_bytes(ds)
    with httpx.Client(base_url=url, timeout=30) as c:
        none = c.post("/v1/infer", content=data, headers=DICOM)
        assert none.status_code == 401 and none.headers["WWW-Authenticate"].startswith("Bearer")
        assert none.json()["error"]["reason"] == "no_credentials"
        wrong = c.post("/v1/infer", content=data, headers={**DICOM, **bearer("bsk_nope")})
        assert wrong.status_code == 401 and wrong.json()["error"]["reason"] == "bad_key"
        scoped = c.post("/v1/infer", content=data, headers={**DICOM, **bearer(keys["reader"])})
        assert scoped.status_code == 403 and scoped.json()["error"]["reason"] == "scope"
        ok = c.post("/v1/infer", content=data, headers={**DICOM, "X-API-Key": keys["infer"]})
        assert ok.status_code == 200
        study = str(ds.StudyInstanceUID)
        assert c.get(f"/v1/studies/{study}/results").status_code == 401
        assert c.get(f"/v1/studies/{study}/results",
                     headers=bearer(keys["reader"])).status_code == 200
        # health and readiness stay open; metrics need their own scope
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/metrics", headers=bearer(keys["infer"])).status_code == 403
        assert c.get("/metrics", headers=bearer(keys["scraper"])).status_code == 200
        # unknown routes do not tell unauthenticated callers what exists
        assert c.get("/admin").status_code == 401
        assert c.get("/admin", headers=bearer(keys["reader"])).status_code == 404
    records = audit_records(gateway)
    assert [(r["action"], r["principal"], r["outcome"], r["status"]) for r in records] == [
        ("infer", None, "no_credentials", 401), ("infer", None, "bad_key", 401),
        ("infer", "key:reader", "scope", 403), ("infer", "key:infer-app", "ok", 200),
        ("read_results", None, "no_credentials", 401), ("read_results", "key:reader", "ok", 200),
        ("metrics", "key:infer-app", "scope", 403), ("metrics", "key:prometheus", "ok", 200),
        ("other", None, "no_credentials", 401), ("other", "key:reader", "refused", 404)]
    assert all(r["source"] == "127.0.0.1" for r in records)
    assert records[5]["study"] == [uid_hash(study)]
    assert records[3]["instance"] == [uid_hash(str(ds.SOPInstanceUID))]
    assert records[3]["series"] == [uid_hash(str(ds.SeriesInstanceUID))]
    text = gateway.config.audit_log.read_text()  # type: ignore[union-attr]
    for raw in (study, str(ds.SOPInstanceUID), "Doe", keys["infer"], keys["reader"]):
        assert raw not in text


def test_stow_and_study_submission_need_scope_submit_with_fake_triton(
        gateway: Gateway, keys: dict[str, str]) -> None:
    import base64

    body = json.dumps({"instances": [base64.b64encode(dicom_bytes(make_instance(4))).decode()]})
    with httpx.Client(base_url=base_url(gateway), timeout=30) as c:
        json_type = {"Content-Type": "application/json"}
        assert c.post("/v1/studies", content=body, headers={
            **json_type, **bearer(keys["infer"])}).status_code == 403
        assert c.post("/v1/studies", content=body, headers={
            **json_type, **bearer(keys["submitter"])}).status_code == 202
        stow = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
        assert c.post("/dicomweb/studies", content=b"", headers=stow).status_code == 401
        assert c.post("/dicomweb/studies", content=b"",
                      headers={**stow, **bearer(keys["reader"])}).status_code == 403


def test_rotation_on_a_running_gateway_with_fake_triton(
        tmp_path: Path, gateway: Gateway, keys: dict[str, str]) -> None:
    path = gateway.config.api_keys
    assert path is not None
    rotated = new_key()
    write_keys(path, [entry("infer-app-2", rotated, ["infer", "read"])])
    time.sleep(1.2)
    with httpx.Client(base_url=base_url(gateway), timeout=30) as c:
        assert c.get("/v2", headers=bearer(keys["reader"])).status_code == 401
        assert c.get("/v2", headers=bearer(rotated)).status_code == 200


def _grpc_client(gw: Gateway) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"{gw.config.http_host}:{gw.config.grpc_port}")


def _infer_input(data: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("DICOM", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    return tensor


def test_grpc_unauthenticated_permission_denied_and_ok_with_fake_triton(
        gateway: Gateway, keys: dict[str, str]) -> None:
    client = _grpc_client(gateway)
    ds = make_instance(5)
    data = dicom_bytes(ds)
    assert client.is_server_live() and client.is_model_ready(MODEL)  # open
    cases = [({}, "StatusCode.UNAUTHENTICATED"),
             ({"authorization": "Bearer bsk_wrong"}, "StatusCode.UNAUTHENTICATED"),
             ({"authorization": f"Bearer {keys['reader']}"}, "StatusCode.PERMISSION_DENIED")]
    for headers, status in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [_infer_input(data)], headers=headers)
        assert err.value.status() == status
    result = client.infer(MODEL, [_infer_input(data)], headers={"x-api-key": keys["infer"]})
    assert result.as_numpy("SCORES").shape == (1, 1)
    meta = client.get_model_metadata(MODEL, headers={"authorization": f"Bearer {keys['reader']}"})
    assert meta.name == MODEL
    with pytest.raises(InferenceServerException) as missing:  # the servicer's own refusal
        client.get_model_metadata("no-such-model",
                                  headers={"authorization": f"Bearer {keys['reader']}"})
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    client.close()
    records = [r for r in audit_records(gateway) if r["protocol"] == "oip_grpc"]
    assert [(r["action"], r["outcome"], r["status"]) for r in records] == [
        ("infer", "no_credentials", "UNAUTHENTICATED"), ("infer", "bad_key", "UNAUTHENTICATED"),
        ("infer", "scope", "PERMISSION_DENIED"), ("infer", "ok", "OK"),
        ("metadata", "ok", "OK"), ("metadata", "refused", "NOT_FOUND")]
    assert records[3]["instance"] == [uid_hash(str(ds.SOPInstanceUID))]


def test_rate_limit_429_with_retry_after_and_grpc_resource_exhausted_with_fake_triton(
        tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "keys.json"
    write_keys(path, [entry("busy-app", key, ["read"], rate_per_s=0.2, burst=2)])
    gw = fake_gateway(tmp_path, api_keys=path, audit_log=tmp_path / "audit.jsonl",
                      rate_limit_per_s=100.0, rate_limit_burst=100)
    try:
        with httpx.Client(base_url=base_url(gw), timeout=30) as c:
            codes = [c.get("/v2", headers=bearer(key)) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert 1 <= int(codes[2].headers["Retry-After"]) <= 5  # 1 token per 5 s
        client = _grpc_client(gw)
        with pytest.raises(InferenceServerException) as err:
            client.get_server_metadata(headers={"authorization": f"Bearer {key}"})
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "retry in" in err.value.message()
        client.close()
    finally:
        gw.stop()
    outcomes = [(r["protocol"], r["outcome"]) for r in audit_records(gw)]
    assert outcomes[-2:] == [("oip_rest", "rate_limited"), ("oip_grpc", "rate_limited")]
    assert refused_count(gw, "oip_rest", "rate_limited") == 1
    assert refused_count(gw, "oip_grpc", "rate_limited") == 1


def test_source_allowlist_refuses_other_addresses_with_fake_triton(tmp_path: Path) -> None:
    gw = fake_gateway(tmp_path, allowed_sources=("10.0.0.0/8", "::1/128"),
                      audit_log=tmp_path / "audit.jsonl")
    try:
        with httpx.Client(base_url=base_url(gw), timeout=30) as c:
            refused = c.post("/v1/infer", content=dicom_bytes(make_instance(1)), headers=DICOM)
            assert refused.status_code == 403
            assert refused.json()["error"]["reason"] == "source_not_allowed"
            assert c.get("/healthz").status_code == 200  # probes come from the node
        client = _grpc_client(gw)
        with pytest.raises(InferenceServerException) as err:
            client.get_server_metadata()
        assert err.value.status() == "StatusCode.PERMISSION_DENIED"
        client.close()
    finally:
        gw.stop()
    assert [r["outcome"] for r in audit_records(gw)] == ["source_not_allowed"] * 2
    assert refused_count(gw, "rest", "source_not_allowed") == 1
    assert refused_count(gw, "oip_grpc", "source_not_allowed") == 1


class GatedFakeInferer(FakeInferer):
    """A fake Triton whose inferences wait for ``gate`` (holds requests in progress)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if batch.any():  # the start-up warm-up infers zeros and is not held
            self.entered.release()
            self.gate.wait(30)
        return super().infer(batch)


def test_concurrency_cap_refuses_work_beyond_it_with_gated_fake_triton(tmp_path: Path) -> None:
    fake = GatedFakeInferer()
    gw = fake_gateway(tmp_path, fake, max_concurrent_requests=1,
                      audit_log=tmp_path / "audit.jsonl")
    data = dicom_bytes(make_instance(1))
    results: list[int] = []
    try:
        first = threading.Thread(target=lambda: results.append(httpx.post(
            f"{base_url(gw)}/v1/infer", content=data, headers=DICOM, timeout=30).status_code))
        first.start()
        assert fake.entered.acquire(timeout=10)
        second = httpx.post(f"{base_url(gw)}/v1/infer", content=data, headers=DICOM, timeout=30)
        assert second.status_code == 503 and second.headers["Retry-After"] == "1"
        assert second.json()["error"]["reason"] == "busy"
        client = _grpc_client(gw)
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [_infer_input(data)])
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        client.close()
        assert httpx.get(f"{base_url(gw)}/v2", timeout=30).status_code == 200  # not work
        fake.gate.set()
        first.join(30)
        assert results == [200]
        third = httpx.post(f"{base_url(gw)}/v1/infer", content=data, headers=DICOM, timeout=30)
        assert third.status_code == 200, "the slot is free again"
    finally:
        fake.gate.set()
        gw.stop()
    outcomes = [(r["principal"], r["outcome"]) for r in audit_records(gw)]
    assert {who for who, _ in outcomes} == {"anonymous"}
    assert [o for _, o in outcomes].count("busy") == 2
    assert refused_count(gw, "rest", "busy") == 1
    assert refused_count(gw, "oip_grpc", "busy") == 1
