"""Server TLS for the HTTP, gRPC (and DICOM) listeners, from PEM files that are re-read when
they change, so a renewed certificate is served to new connections without a restart.

Kubernetes Secrets mounted as volumes are such files: the kubelet swaps the ``..data`` symlink
when the Secret changes, which changes what ``stat`` (following links) reports.

- Python ``ssl`` (uvicorn, pynetdicom): the listener's context has an SNI callback, which
  OpenSSL calls on every ClientHello (with or without SNI); it hands the handshake a freshly
  loaded context when the files changed.
- gRPC: ``grpc.dynamic_ssl_server_credentials`` asks a fetcher before each handshake; it
  returns a new certificate configuration when the files changed, None otherwise.

A changed file that does not load (a half-written key, a key that does not match) is logged
and the previous certificate stays in use.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.errors import ConfigError

LOG = logging.getLogger(__name__)
CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    ca: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.ca,) if self.ca is not None else ())

    def fingerprint(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self.paths():
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)


def build_context(files: CertFiles, client_certs: str) -> ssl.SSLContext:
    """``client_certs``: ``none``, ``optional`` (verified when presented) or ``required``;
    both need ``files.ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
        if files.ca is not None:
            ctx.load_verify_locations(cafile=files.ca)
            ctx.verify_mode = (ssl.CERT_REQUIRED if client_certs == "required"
                               else ssl.CERT_OPTIONAL)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS certificate, key or CA unusable: {exc}") from exc
    return ctx


def subject_of(peercert: Any) -> str | None:
    """``ssl.getpeercert()`` dict -> ``CN=...,O=...`` (None without a verified cert)."""
    if not peercert:
        return None
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
             "domainComponent": "DC", "emailAddress": "emailAddress"}
    parts = [f"{short.get(k, k)}={v}" for rdn in peercert.get("subject", ()) for k, v in rdn]
    return ",".join(parts) or None


class _Watched:
    """A value rebuilt from the files when they change (checked at most once a second)."""

    def __init__(self, files: CertFiles, build: Callable[[], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.files = files
        self._build = build
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = files.fingerprint()
        self.value = build()
        self._checked = clock()
        self.reloads = 0

    def refresh(self) -> bool:
        """True when a new value was loaded."""
        now = self._clock()
        with self._lock:
            if now - self._checked < CHECK_INTERVAL_S:
                return False
            self._checked = now
            try:
                seen = self.files.fingerprint()
                if seen == self._seen:
                    return False
                value = self._build()
            except (OSError, ConfigError, ValueError) as exc:
                LOG.error("TLS files changed but did not load; keeping the previous "
                          "certificate: %s", exc)
                return False
            self._seen, self.value = seen, value
            self.reloads += 1
            LOG.info("TLS certificate reloaded from %s", self.files.cert)
            return True


class ReloadingSSLContext:
    """``context`` is what a listener gets; each handshake on it switches to the newest
    context loaded from the files."""

    def __init__(self, files: CertFiles, client_certs: str = "optional",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._watched = _Watched(files, lambda: self._new(files, client_certs), clock)
        self.context: ssl.SSLContext = self._new(files, client_certs)

    def _new(self, files: CertFiles, client_certs: str) -> ssl.SSLContext:
        ctx = build_context(files, client_certs)
        ctx.sni_callback = self._on_hello
        return ctx

    def _on_hello(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                  ctx: ssl.SSLContext) -> None:
        self._watched.refresh()
        current = self._watched.value
        if conn.context is not current:
            conn.context = current

    @property
    def reloads(self) -> int:
        return self._watched.reloads


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _grpc_config(files: CertFiles) -> Any:
    # Check the pair loads in Python's ssl too: gRPC would only fail at the next handshake.
    build_context(files, "required" if files.ca is not None else "none")
    return grpc.ssl_server_certificate_configuration(
        [(_read(files.key), _read(files.cert))],
        root_certificates=_read(files.ca) if files.ca is not None else None)


class ReloadingGrpcCredentials:
    """Server credentials for grpc; with a CA, client certificates are required (gRPC's Python
    API has no "optional" mode)."""

    def __init__(self, files: CertFiles, clock: Callable[[], float] = time.monotonic) -> None:
        self._watched = _Watched(files, lambda: _grpc_config(files), clock)
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._watched.value, self._fetch,
            require_client_authentication=files.ca is not None)

    def _fetch(self) -> Any:
        return self._watched.value if self._watched.refresh() else None

    @property
    def reloads(self) -> int:
        return self._watched.reloads
