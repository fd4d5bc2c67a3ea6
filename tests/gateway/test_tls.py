"""TLS on the HTTP and gRPC listeners: certificates reloaded when the files change, client
certificates as principals, and plain text only when asked for."""

from __future__ import annotations

import json
import os
import ssl
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services.cli import _parser, main
from services.commands.gateway import config_from_args
from services.errors import ConfigError
from services.gateway.config import GatewayConfig
from services.gateway.security.auth import normalize_subject
from services.gateway.security.tls import CertFiles, ReloadingGrpcCredentials, ReloadingSSLContext
from tests.conftest import TINY_MANIFEST
from tests.gateway.harness import fake_gateway, model_repository
from tests.gateway.pki import client_context, issue, make_pki, served_certificate
from tests.gateway.util import dicom_bytes, make_instance

RELOAD_WAIT_S = 1.2  # tls.CHECK_INTERVAL_S plus a margin


def _keys(path: Path, entries: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"keys": entries}))
    return path


def test_http_and_grpc_serve_a_renewed_certificate_without_restart_with_fake_triton(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    gw = fake_gateway(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      tls_ca=pki / "ca.pem", http_tls=True)
    try:
        host, http, grpc_port = gw.config.http_host, gw.config.http_port, gw.config.grpc_port
        before_http = served_certificate(host, http, pki)
        before_grpc = _grpc_served(host, grpc_port, pki)
        assert before_http == before_grpc == _der(pki / "server.pem")
        issue(pki, "server", "/CN=server-renewed")  # replaced in place, as a Secret update
        time.sleep(RELOAD_WAIT_S)
        after_http = served_certificate(host, http, pki)
        after_grpc = _grpc_served(host, grpc_port, pki)
        assert after_http == after_grpc == _der(pki / "server.pem") != before_http
        # and the listener still serves requests over the new certificate
        with httpx.Client(verify=client_context(pki, False)) as client:
            assert client.get(f"https://localhost:{http}/healthz").status_code == 200
    finally:
        gw.stop()


def _der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def _grpc_served(host: str, port: int, pki: Path) -> bytes:
    """The certificate the gRPC listener presents (client certificate and ALPN h2, as gRPC
    clients send them)."""
    import socket

    ctx = client_context(pki, with_cert=True)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_a_broken_replacement_keeps_the_previous_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    files = CertFiles(pki / "server.pem", pki / "server.key")
    clock = [0.0]
    ctx = ReloadingSSLContext(files, clock=lambda: clock[0])
    creds = ReloadingGrpcCredentials(files, clock=lambda: clock[0])
    (pki / "server.key").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    clock[0] = 10.0
    assert creds._fetch() is None and creds.reloads == 0
    ctx._watched.refresh()
    assert ctx.reloads == 0 and ctx._watched.value is not None
    issue(pki, "server", "/CN=server-2")
    clock[0] = 20.0
    assert creds._fetch() is not None and creds.reloads == 1


def test_client_certificate_subject_is_the_principal_over_http_and_grpc_with_fake_triton(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    keys = _keys(tmp_path / "keys.json", [
        {"name": "radiology-app", "subject": "O=Radiology, CN=client", "scopes": ["infer"]}])
    audit = tmp_path / "audit.jsonl"
    gw = fake_gateway(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      tls_ca=pki / "ca.pem", http_tls=True, api_keys=keys, audit_log=audit)
    try:
        data = dicom_bytes(make_instance(1))
        url = f"https://localhost:{gw.config.http_port}/v1/infer"
        with httpx.Client(verify=client_context(pki, True)) as client:
            ok = client.post(url, content=data, headers={"Content-Type": "application/dicom"})
        assert ok.status_code == 200, ok.text
        with httpx.Client(verify=client_context(pki, False)) as client:  # no certificate
            assert client.post(url, content=data, headers={
                "Content-Type": "application/dicom"}).status_code == 401
        tc = grpcclient.InferenceServerClient(
            f"localhost:{gw.config.grpc_port}", ssl=True,
            root_certificates=str(pki / "ca.pem"), private_key=str(pki / "client.key"),
            certificate_chain=str(pki / "client.pem"))
        tensor = grpcclient.InferInput("DICOM", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        assert tc.infer(TINY_MANIFEST.name, [tensor]).as_numpy("SCORES").shape == (1, 1)
        with pytest.raises(InferenceServerException) as denied:
            tc.get_model_metadata(TINY_MANIFEST.name)  # needs scope read
        assert "PERMISSION_DENIED" in str(denied.value.status())
        tc.close()
    finally:
        gw.stop()
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["protocol"], r["principal"], r["outcome"]) for r in records] == [
        ("rest", "cert:radiology-app", "ok"), ("rest", None, "no_credentials"),
        ("oip_grpc", "cert:radiology-app", "ok"), ("oip_grpc", "cert:radiology-app", "scope")]
    # Python's ssl and gRPC write the subject in opposite orders; both name the entry
    subjects = {normalize_subject(records[k]["client_subject"]) for k in (0, 2, 3)}
    assert subjects == {"CN=client,O=Radiology"}
    assert records[1]["client_subject"] is None and records[1]["auth"] == "none"


def test_grpc_requires_a_client_certificate_when_a_ca_is_configured_with_fake_triton(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    gw = fake_gateway(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      tls_ca=pki / "ca.pem", http_tls=True)
    try:
        channel = grpc.secure_channel(f"localhost:{gw.config.grpc_port}",
                                      grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes()))
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=3)
        channel.close()
    finally:
        gw.stop()


def test_plaintext_http_is_refused_unless_chosen_explicitly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = model_repository(tmp_path)
    base = ["gateway", "--repository", str(repo), "--model", TINY_MANIFEST.name,
            "--spool", str(tmp_path / "spool"), "--no-auth"]
    assert main(base) == 2
    assert "--plaintext explicitly" in capsys.readouterr().err
    config = config_from_args(_parser().parse_args([*base, "--plaintext"]), "x:1")
    assert not config.http_tls
    pki = make_pki(tmp_path / "pki")
    tls = config_from_args(_parser().parse_args([
        *base, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]),
        "x:1")
    assert tls.http_tls and tls.dicom_tls and tls.dicom_tls_context() is not None
    no_dicom_tls = config_from_args(_parser().parse_args([
        *base, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--dicom-plaintext"]), "x:1")
    assert no_dicom_tls.http_tls and no_dicom_tls.dicom_tls_context() is None
    with pytest.raises(ConfigError, match="http_tls needs tls_cert"):
        GatewayConfig(model_repository=repo, model_name=TINY_MANIFEST.name,
                      triton_grpc_url="x:1", spool_dir=tmp_path / "s", http_tls=True)


def test_tls_listener_refuses_plaintext_clients_with_fake_triton(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    gw = fake_gateway(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      http_tls=True)
    try:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{gw.config.http_port}/healthz", timeout=3)
        assert httpx.get(f"https://localhost:{gw.config.http_port}/healthz",
                         verify=client_context(pki, False), timeout=3).status_code == 200
    finally:
        gw.stop()


def test_dicom_tls_serves_a_renewed_certificate_without_restart_with_fake_triton(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    gw = fake_gateway(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      tls_ca=pki / "ca.pem")
    try:
        host, port = gw.config.dicom_host, gw.config.dicom_port
        before = served_certificate(host, port, pki, with_cert=True)
        issue(pki, "server", "/CN=dicom-renewed")
        time.sleep(RELOAD_WAIT_S)
        after = served_certificate(host, port, pki, with_cert=True)
        assert before != after == _der(pki / "server.pem")
    finally:
        gw.stop()


def _kubelet_update(secret: Path, files: dict[str, bytes], version: str) -> None:
    """What the kubelet does to a mounted Secret: a new timestamped directory, then an atomic
    swap of the ``..data`` symlink; the visible names are symlinks through ``..data``."""
    target = secret / f"..{version}"
    target.mkdir()
    for name, data in files.items():
        (target / name).write_bytes(data)
        link = secret / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    tmp = secret / "..data_tmp"
    tmp.symlink_to(target.name)
    os.replace(tmp, secret / "..data")


def test_kubernetes_secret_updates_are_picked_up_for_certificates_and_keys(
        tmp_path: Path) -> None:
    from services.gateway.security.auth import KeyStore, hash_key

    pki = make_pki(tmp_path / "pki")
    secret = tmp_path / "secret"
    secret.mkdir()
    _kubelet_update(secret, {"tls.crt": (pki / "server.pem").read_bytes(),
                             "tls.key": (pki / "server.key").read_bytes(),
                             "keys.yaml": json.dumps({"keys": [
                                 {"name": "a", "sha256": hash_key("bsk_a"),
                                  "scopes": ["read"]}]}).encode()}, "v1")
    clock = [0.0]
    ctx = ReloadingSSLContext(CertFiles(secret / "tls.crt", secret / "tls.key"),
                              clock=lambda: clock[0])
    keys = KeyStore(secret / "keys.yaml", clock=lambda: clock[0])
    assert keys.by_key("bsk_a") is not None
    issue(pki, "server", "/CN=rotated")
    _kubelet_update(secret, {"tls.crt": (pki / "server.pem").read_bytes(),
                             "tls.key": (pki / "server.key").read_bytes(),
                             "keys.yaml": json.dumps({"keys": [
                                 {"name": "b", "sha256": hash_key("bsk_b"),
                                  "scopes": ["read"]}]}).encode()}, "v2")
    clock[0] = 5.0
    assert ctx._watched.refresh() and ctx.reloads == 1
    assert keys.by_key("bsk_a") is None and keys.by_key("bsk_b") is not None


def test_stop_does_not_wait_for_idle_tls_clients_with_fake_triton(tmp_path: Path) -> None:
    """A client that got its answer and keeps the TLS connection open (or never finishes
    sending a refused upload) must not hold up the gateway's stop."""
    import socket

    pki = make_pki(tmp_path / "pki")
    gw = fake_gateway(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      http_tls=True, api_keys=_keys(tmp_path / "keys.json", []))
    ctx = client_context(pki, False)
    idle = ctx.wrap_socket(socket.create_connection(("localhost", gw.config.http_port)),
                           server_hostname="localhost")
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert b"200 OK" in idle.recv(4096)
    upload = ctx.wrap_socket(socket.create_connection(("localhost", gw.config.http_port)),
                             server_hostname="localhost")
    upload.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                   b"application/dicom\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    assert b"401" in upload.recv(4096)  # refused before the body is read; the rest never comes
    start = time.monotonic()
    gw.stop()
    elapsed = time.monotonic() - start
    idle.close()
    upload.close()
    assert elapsed < 5.0, f"stop took {elapsed:.1f} s"
