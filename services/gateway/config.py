"""Gateway configuration: frozen, validated once at start-up."""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from services.errors import ConfigError

_AE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs; the model's manifest is read from the model repository."""

    model_repository: Path
    model_name: str
    triton_grpc_url: str
    spool_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    ae_title: str = "BEDSIDE"
    # Calling AE titles allowed to associate; empty allows every calling AE title.
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 8
    # Data-set bytes one association may carry; beyond, C-STORE answers 0xA700 (reason
    # association_too_large) until the peer opens a new association. 0 means no limit.
    max_association_bytes: int = 0
    # Largest P-DATA PDU we accept (told to the peer at association); 0 means no limit.
    # 1 MiB: a 512x512 CT slice arrives in a few PDUs (dcmtk sends at most 128 KiB) instead of
    # 33 of 16 KiB, each one a trip through pynetdicom's Python reactor (loadtests.bench_ingest).
    max_pdu_bytes: int = 1024 * 1024
    # DICOM TLS (PS3.15 B.1): certificate and key enable it; a CA file also requires and
    # verifies client certificates (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Open Inference Protocol v2 over gRPC, on http_host; 0 (the default here) leaves it off.
    # The CLI turns it on at 8081 unless told otherwise.
    grpc_port: int = 0
    max_request_bytes: int = 64 * 1024 * 1024
    # Acknowledged-but-unfinished instances above which C-STORE answers 0xA700 (back-pressure).
    max_spool_depth: int = 1000
    # New work (C-STORE, STOW-RS, POST /v1/studies) is refused (0xA700 / 503 + Retry-After,
    # reason disk_full) while the spool's filesystem has less free space than this.
    min_free_bytes: int = 1024**3
    triton_timeout_s: float = 10.0
    triton_retry_backoff_s: float = 0.5
    # Circuit breaker on the Triton client: open after this many consecutive "unavailable"
    # failures; while open, calls fail fast; after the cool-down one probe call is let through.
    triton_breaker_failures: int = 5
    triton_breaker_cooldown_s: float = 5.0
    # Grouping (processing/): None takes the manifest's grouping.level / grouping.timeout_s.
    group_level: str | None = None  # "instance" | "series" | "study"
    group_timeout_s: float | None = None  # inactivity timeout closing a series/study group
    # Job-table rows in a final state are deleted after this many seconds (start-up, hourly).
    job_retention_s: float = 7 * 86400.0
    # Results delivery (delivery/): the routes file (YAML, or JSON by suffix),
    # loaded and validated once when the gateway is built; None delivers nothing.
    routes_file: Path | None = None
    # Security (README "Security"). The defaults here are permissive for library use and tests;
    # the `bedside gateway` command makes the operator choose keys or --no-auth, TLS or
    # --plaintext. api_keys: the keys file (security/auth.py); None turns authentication off.
    api_keys: Path | None = None
    # HTTP and gRPC listeners serve TLS with tls_cert/tls_key (tls_ca: client certificates,
    # optional on HTTP, required on gRPC); DIMSE uses DICOM TLS with them unless dicom_tls is
    # False.
    http_tls: bool = False
    dicom_tls: bool = True
    # Source networks (CIDR) allowed on HTTP and gRPC; empty allows every address.
    allowed_sources: tuple[str, ...] = ()
    # Per-principal token bucket (requests per second, burst); 0 turns it off.
    rate_limit_per_s: float = 0.0
    rate_limit_burst: float = 1.0
    # Concurrent infer/submit calls over HTTP and gRPC; 0 means no cap.
    max_concurrent_requests: int = 0
    # Audit trail: JSON lines appended to this file ("-": standard output) and/or sent to
    # syslog (host:port over UDP, or a socket path such as /dev/log).
    audit_log: Path | None = None
    audit_syslog: str | None = None

    def __post_init__(self) -> None:
        if not _AE_RE.match(self.ae_title) or self.ae_title != self.ae_title.strip():
            raise ConfigError(f"ae_title {self.ae_title!r}: 1-16 printable characters, no '\\'")
        for name in ("http_port", "dicom_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ConfigError(f"{name} {port} is not a TCP port")
        if not 0 <= self.grpc_port < 65536:
            raise ConfigError(f"grpc_port {self.grpc_port} is not a TCP port (0 disables gRPC)")
        for aet in self.allowed_calling_aets:
            if not _AE_RE.match(aet) or aet != aet.strip():
                raise ConfigError(f"allowed calling AE title {aet!r}: 1-16 printable "
                                  "characters, no '\\', no surrounding spaces")
        if self.max_pdu_bytes != 0 and not 4096 <= self.max_pdu_bytes < 2**32:
            raise ConfigError(f"max_pdu_bytes {self.max_pdu_bytes}: 0 (no limit) or "
                              "4096..4294967295")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("DICOM TLS needs both tls_cert and tls_key")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_ca (client certificate check) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"{name} {path} is not a file")
        if self.max_associations < 1:
            raise ConfigError("max_associations must be >= 1")
        if self.max_association_bytes < 0:
            raise ConfigError("max_association_bytes must be >= 0 (0 = no limit)")
        if self.max_spool_depth < 1:
            raise ConfigError("max_spool_depth must be >= 1")
        if self.max_request_bytes < 1024:
            raise ConfigError("max_request_bytes must be >= 1024")
        if self.triton_timeout_s <= 0 or self.triton_retry_backoff_s <= 0:
            raise ConfigError("triton timeouts must be > 0")
        if self.min_free_bytes < 0:
            raise ConfigError("min_free_bytes must be >= 0 (0 disables the disk watermark)")
        if self.group_level not in (None, "instance", "series", "study"):
            raise ConfigError(f"group_level {self.group_level!r}: instance, series or study")
        if self.group_timeout_s is not None and self.group_timeout_s <= 0:
            raise ConfigError("group_timeout_s must be > 0")
        if self.job_retention_s <= 0:
            raise ConfigError("job_retention_s must be > 0")
        if self.routes_file is not None and not self.routes_file.is_file():
            raise ConfigError(f"routes_file {self.routes_file} is not a file")
        if self.triton_breaker_failures < 1 or self.triton_breaker_cooldown_s <= 0:
            raise ConfigError("triton_breaker_failures must be >= 1 and "
                              "triton_breaker_cooldown_s > 0")
        self._check_security()
        if not (self.model_repository / self.model_name / "manifest.json").is_file():
            raise ConfigError(
                f"no manifest.json for model {self.model_name!r} in {self.model_repository}"
            )

    def _check_security(self) -> None:
        if self.http_tls and self.tls_cert is None:
            raise ConfigError("http_tls needs tls_cert and tls_key")
        if self.api_keys is not None and not self.api_keys.is_file():
            raise ConfigError(f"api_keys {self.api_keys} is not a file")
        for source in self.allowed_sources:
            try:
                ipaddress.ip_network(source, strict=False)
            except ValueError as exc:
                raise ConfigError(f"allowed source {source!r} is not an address or "
                                  "CIDR network") from exc
        if self.rate_limit_per_s < 0 or (self.rate_limit_per_s > 0
                                         and self.rate_limit_burst < 1):
            raise ConfigError("rate_limit_per_s must be >= 0 (0 = off) and "
                              "rate_limit_burst >= 1")
        if self.max_concurrent_requests < 0:
            raise ConfigError("max_concurrent_requests must be >= 0 (0 = no cap)")

    @property
    def manifest_path(self) -> Path:
        return self.model_repository / self.model_name / "manifest.json"

    def dicom_tls_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context for the DIMSE listener, or None without DICOM TLS."""
        if self.tls_cert is None or self.tls_key is None or not self.dicom_tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
            if self.tls_ca is not None:
                ctx.load_verify_locations(cafile=self.tls_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"DICOM TLS certificate, key or CA unusable: {exc}") from exc
        return ctx
