"""A throwaway openssl CA for TLS tests: a server certificate for localhost and client
certificates, re-issuable in place (certificate reload tests)."""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def make_ca(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=Bedside test CA", cwd=root)
    (root / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    return root


def issue(root: Path, name: str, subject: str, out: Path | None = None) -> tuple[Path, Path]:
    """A certificate for ``subject`` (``/CN=x/O=y``) signed by the CA in ``root``; written to
    ``out``/``name``.pem and .key, replacing what was there atomically (as the kubelet does)."""
    out = out or root
    _openssl("req", *_EC, "-keyout", f"{name}.key.new", "-out", f"{name}.csr", "-subj", subject,
             cwd=root)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem.new", "-days", "1", "-extfile", "san.ext",
             cwd=root)
    cert, key = out / f"{name}.pem", out / f"{name}.key"
    os.replace(root / f"{name}.key.new", key)
    os.replace(root / f"{name}.pem.new", cert)
    return cert, key


def make_pki(root: Path) -> Path:
    """CA, ``server`` (CN=server, localhost) and ``client`` (CN=client,O=Radiology)."""
    make_ca(root)
    issue(root, "server", "/CN=server")
    issue(root, "client", "/CN=client/O=Radiology")
    return root


def client_context(pki: Path, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if with_cert:
        ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    return ctx


def served_certificate(host: str, port: int, pki: Path, with_cert: bool = False) -> bytes:
    """The DER certificate a TLS server presents to a new connection."""
    import socket

    ctx = client_context(pki, with_cert)
    with socket.create_connection((host, port), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der
