"""Gateway configuration: every setting declared once, frozen, validated once at start-up.

Each field of ``GatewayConfig`` is declared with ``setting(...)``: its default for library use
(tests, embedding), the flag of ``bedside gateway`` / ``bedside serve`` and the default the
command gives it where that differs (with why), and the Helm chart value that renders the flag
(``charts/bedside/values.yaml``), or why the chart sets it otherwise. The commands' flags are
generated from these declarations (``add_flags``) and read back (``settings_from_args``);
``tests/deploy/test_settings.py`` checks that the chart's values, its rendered command line and
these declarations agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import ssl
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from services.errors import ConfigError

_AE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")
SETTING: Final = "setting"  # the key of a field's declaration in its dataclass metadata
SQLITE, POSTGRESQL = "sqlite", "postgresql"  # the job table's backends (store/jobdb.py)
PASSWORD_ENV: Final = "BEDSIDE_JOB_DB_PASSWORD"


class _Same:
    def __repr__(self) -> str:
        return "SAME"


SAME: Final[Any] = _Same()  # a command or chart default that is the field's default


@dataclass(frozen=True)
class Setting:
    """How one ``GatewayConfig`` field is set from outside the process.

    ``chart`` is the values path whose value the chart renders as the flag; without one,
    ``chart_fixed`` is the literal the chart always passes (a mount path, a bind address), or
    ``why`` says how the chart derives the flag from other values. ``why`` also explains any
    ``command_default`` or ``chart_default`` that differs from the field's default.
    """

    flag: str
    help: str = ""
    command_default: Any = SAME
    chart: str | None = None
    chart_default: Any = SAME
    chart_fixed: str | None = None
    why: str = ""
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    commands: tuple[str, ...] = ("gateway", "serve")
    # (flag, help) of the alternative the operator must choose instead of this flag.
    alternative: tuple[str, str] | None = None

    @property
    def dest(self) -> str:
        """The argparse attribute the flag fills (argparse's own naming)."""
        return self.flag.lstrip("-").replace("-", "_")


def setting(default: Any = dataclasses.MISSING, *, flag: str, help: str = "",
            command_default: Any = SAME, chart: str | None = None, chart_default: Any = SAME,
            chart_fixed: str | None = None, why: str = "", metavar: str | None = None,
            choices: tuple[str, ...] | None = None,
            commands: tuple[str, ...] = ("gateway", "serve"),
            alternative: tuple[str, str] | None = None) -> Any:
    """A ``GatewayConfig`` field with its declaration (no default: required)."""
    spec = Setting(flag, help, command_default, chart, chart_default, chart_fixed, why,
                   metavar, choices, commands, alternative)
    return field(default=default, metadata={SETTING: spec})


_CHART_TLS = ("the chart passes the files of its mounted TLS Secret: gateway.tls (HTTP, gRPC and "
              "DIMSE) or else gateway.dicomTls (DIMSE only)")


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs; the model's manifest is read from the model repository."""

    model_repository: Path = setting(
        flag="--repository", help="Triton model repository (the model's manifest.json is read)",
        chart_fixed="/etc/bedside/models", why="the model ConfigMap's mount path")
    model_name: str = setting(
        flag="--model", why="the chart passes model.name (`bedside deploy` sets it from the "
                            "model repository): a model, not a default")
    triton_grpc_url: str = setting(
        flag="--triton-url", help="Triton gRPC host:port", commands=("gateway",),
        command_default="127.0.0.1:8001",
        why="`bedside serve` starts Triton and passes its address; the chart passes "
            "gateway.tritonUrl, else this release's Triton or KServe predictor Service")
    spool_dir: Path = setting(
        flag="--spool", command_default=Path("bedside-spool"),
        chart_fixed="/var/lib/bedside/spool", why="the spool volume's mount path")
    # More models served besides ``model_name`` (the default model, which /v1/infer uses
    # unless told otherwise): their manifests are read from the same repository; "*" serves
    # every model of the repository that has a manifest.json.
    models: tuple[str, ...] = setting(
        (), flag="--serve-model", metavar="NAME", chart="gateway.models",
        help="another model of the repository to serve as well (repeatable; '*': every model "
             "with a manifest.json in --repository)")
    # Versions (inference/versions.py): a shadow version runs beside the primary on the same
    # inputs (stored and compared, never returned or delivered); a canary version answers for
    # a share of studies (sticky per study). `bedside models promote|rollback` changes the
    # primary while the gateway runs; that choice is kept on the spool volume.
    shadow_versions: tuple[str, ...] = setting(
        (), flag="--shadow", metavar="MODEL=VERSION", chart="gateway.versions.shadow",
        help="run VERSION of MODEL in shadow: inferred on the same inputs, compared with the "
             "primary, never returned or delivered (repeatable)")
    canary_versions: tuple[str, ...] = setting(
        (), flag="--canary", metavar="MODEL=VERSION:SHARE", chart="gateway.versions.canary",
        help="VERSION of MODEL answers for SHARE (0-1) of studies, chosen per study "
             "(repeatable)")
    http_host: str = setting(
        "127.0.0.1", flag="--http-host", chart_fixed="0.0.0.0",
        why="a pod listens on every address; Services and NetworkPolicies choose who connects")
    http_port: int = setting(8080, flag="--http-port", chart="gateway.ports.http")
    dicom_host: str = setting(
        "127.0.0.1", flag="--dicom-host", chart_fixed="0.0.0.0",
        why="a pod listens on every address; Services and NetworkPolicies choose who connects")
    dicom_port: int = setting(11112, flag="--dicom-port", chart="gateway.ports.dicom")
    ae_title: str = setting("BEDSIDE", flag="--ae-title", chart="gateway.aeTitle")
    # Calling AE titles allowed to associate; empty allows every calling AE title.
    allowed_calling_aets: tuple[str, ...] = setting(
        (), flag="--allowed-ae", metavar="AE_TITLE", chart="gateway.allowedAETitles",
        help="calling AE title allowed to associate (repeatable; none given: any calling AE "
             "title)")
    max_associations: int = setting(8, flag="--max-associations",
                                     chart="gateway.maxAssociations")
    # Concurrent associations one calling AE title may hold, so that one peer cannot take every
    # slot of max_associations; beyond, A-ASSOCIATE-RJ (transient, local limit exceeded).
    # 0 means no per-AE limit.
    max_associations_per_ae: int = setting(
        4, flag="--max-associations-per-ae", chart="gateway.maxAssociationsPerAE",
        help="concurrent DIMSE associations one calling AE title may hold; beyond, "
             "A-ASSOCIATE-RJ (0: no per-AE limit)")
    # Seconds an association may last from its acceptance; past it, it is aborted (A-ABORT),
    # however busy it is, so a peer cannot hold a slot forever. 0 means no cap.
    association_lifetime_s: float = setting(
        3600.0, flag="--association-lifetime", metavar="SECONDS",
        chart="gateway.associationLifetimeSeconds",
        help="seconds a DIMSE association may last before it is aborted (0: no cap)")
    # Data-set bytes one association may carry; beyond, C-STORE answers 0xA700 (reason
    # association_too_large) until the peer opens a new association. 0 means no limit.
    max_association_bytes: int = setting(
        0, flag="--max-association-bytes", chart="gateway.maxAssociationBytes",
        help="data-set bytes one DIMSE association may carry; beyond, C-STORE answers 0xA700 "
             "(0: no limit)")
    # Largest P-DATA PDU we accept (told to the peer at association); 0 means no limit.
    # 1 MiB: a 512x512 CT slice arrives in a few PDUs (dcmtk sends at most 128 KiB) instead of
    # 33 of 16 KiB, each one a trip through pynetdicom's Python reactor (loadtests.bench_ingest).
    max_pdu_bytes: int = setting(
        1024 * 1024, flag="--max-pdu", chart="gateway.maxPduBytes",
        help="largest DIMSE PDU accepted, bytes (0: no limit)")
    # DICOM TLS (PS3.15 B.1): certificate and key enable it; a CA file also requires and
    # verifies client certificates (mutual TLS).
    tls_cert: Path | None = setting(
        None, flag="--tls-cert", why=_CHART_TLS,
        help="server certificate (PEM) for HTTP, gRPC and DICOM TLS; re-read when it changes")
    tls_key: Path | None = setting(None, flag="--tls-key", why=_CHART_TLS,
                                   help="private key of --tls-cert (PEM)")
    tls_ca: Path | None = setting(
        None, flag="--tls-ca",
        why=_CHART_TLS + "; ca.crt when gateway.tls.clientCA / gateway.dicomTls.requireClientCert",
        help="CA bundle for client certificates: required on DICOM TLS and gRPC, optional on "
             "HTTP (else an API key)")
    # Open Inference Protocol v2 over gRPC, on http_host; 0 leaves it off.
    grpc_port: int = setting(
        0, flag="--grpc-port", command_default=8081, chart="gateway.ports.grpc",
        why="off for library use and tests (no fixed port taken); the commands serve it",
        help="Open Inference Protocol v2 gRPC port on --http-host (0: off)")
    # Gateway processes in the pod, each serving DIMSE, HTTP and gRPC on the same ports
    # (SO_REUSEPORT) under one supervisor; 0 means one per CPU the pod is given (its CPU limit,
    # else the CPUs it may run on). 1 runs the gateway in the command's own process.
    processes: int = setting(
        1, flag="--processes", command_default=0, chart="gateway.processes",
        why="library use and tests embed one gateway in their own process; the commands "
            "default to one process per CPU the pod is given",
        help="gateway processes serving the same ports (0: one per CPU given: the cgroup CPU "
             "limit, else the CPU affinity)")
    max_request_bytes: int = setting(
        64 * 1024 * 1024, flag="--max-request-bytes", chart="gateway.maxRequestBytes",
        help="largest HTTP request body or gRPC message accepted, bytes")
    # Acknowledged-but-unfinished instances above which C-STORE answers 0xA700 (back-pressure).
    max_spool_depth: int = setting(
        1000, flag="--max-spool-depth", chart="gateway.spool.maxDepth",
        help="acknowledged but unfinished instances above which new work is refused "
             "(C-STORE 0xA700, HTTP 503)")
    # New work (C-STORE, STOW-RS, POST /v1/studies) is refused (0xA700 / 503 + Retry-After,
    # reason disk_full) while the spool's filesystem has less free space than this.
    min_free_bytes: int = setting(
        1024**3, flag="--min-free-bytes", chart="gateway.spool.minFreeBytes",
        help="refuse new work below this much free spool disk (0 = off)")
    triton_timeout_s: float = setting(
        10.0, flag="--triton-timeout", metavar="SECONDS",
        chart="gateway.tritonClient.timeoutSeconds", help="deadline of one Triton call")
    triton_retry_backoff_s: float = setting(
        0.5, flag="--triton-retry-backoff", metavar="SECONDS",
        chart="gateway.tritonClient.retryBackoffSeconds",
        help="first wait before retrying while Triton is unavailable (doubles per attempt, "
             "capped)")
    # Circuit breaker on the Triton client: open after this many consecutive "unavailable"
    # failures; while open, calls fail fast; after the cool-down one probe call is let through.
    triton_breaker_failures: int = setting(
        5, flag="--triton-breaker-failures", chart="gateway.tritonClient.breakerFailures",
        help="consecutive Triton-unavailable failures that open the breaker")
    triton_breaker_cooldown_s: float = setting(
        5.0, flag="--triton-breaker-cooldown",
        chart="gateway.tritonClient.breakerCooldownSeconds",
        help="seconds before an open breaker lets one probe through")
    # Grouping (processing/): None takes the manifest's grouping.level / grouping.timeout_s.
    group_level: str | None = setting(
        None, flag="--group-level", choices=("instance", "series", "study"),
        chart="gateway.grouping.level",
        help="group instances before inferring (default: the manifest's grouping.level)")
    group_timeout_s: float | None = setting(
        None, flag="--group-timeout", metavar="SECONDS", chart="gateway.grouping.timeoutSeconds",
        help="a group closes after this long without a new instance (default: the manifest's "
             "grouping.timeout_s)")
    # Job-table rows in a final state are deleted after this many seconds (start-up, hourly).
    job_retention_s: float = setting(
        7 * 86400.0, flag="--job-retention", metavar="SECONDS",
        chart="gateway.jobRetentionSeconds",
        help="finished job-table rows are deleted after this long")
    # The job table (store/jobdb.py): "sqlite" (jobs.sqlite3 beside the spool: one pod, any
    # number of gateway processes) or a PostgreSQL URL without a password (several replicas,
    # the spool then on a ReadWriteMany volume they share). The password comes from
    # job_db_password_file or $BEDSIDE_JOB_DB_PASSWORD, never from the URL or a log.
    job_db: str = setting(
        "sqlite", flag="--job-db", metavar="sqlite|postgresql://USER@HOST:PORT/DB",
        why="the chart passes sqlite, or with gateway.jobTable.backend postgresql the URL it "
            "builds from gateway.jobTable.postgresql (host, port, database, user)",
        help="job table: sqlite (beside the spool) or a postgresql:// URL shared by several "
             "replicas (no password in it: --job-db-password-file or "
             "$BEDSIDE_JOB_DB_PASSWORD)")
    job_db_password_file: Path | None = setting(
        None, flag="--job-db-password-file", metavar="FILE",
        why="the chart gives the password as $BEDSIDE_JOB_DB_PASSWORD from the Secret "
            "gateway.jobTable.postgresql.passwordSecret (secretKeyRef), not as a file",
        help="file holding the PostgreSQL job table's password (else $BEDSIDE_JOB_DB_PASSWORD)")
    # A worker renews its lease in the job table every third of this; a worker silent for this
    # long (killed) has its claims taken over by the others.
    job_lease_s: float = setting(
        15.0, flag="--job-lease", metavar="SECONDS", chart="gateway.jobTable.leaseSeconds",
        help="seconds after which a silent gateway worker's jobs and groups are taken over by "
             "the others")
    # Results delivery (delivery/): the routes file (YAML, or JSON by suffix),
    # loaded and validated once when the gateway is built; None delivers nothing.
    routes_file: Path | None = setting(
        None, flag="--routes", metavar="FILE",
        why="gateway.delivery.routes becomes a ConfigMap; the chart passes its mounted file",
        help="routes file (YAML/JSON): deliver DICOM results (SR/SEG) to destinations by "
             "C-STORE or STOW-RS, optionally de-identified")
    # Security (README "Security"). The defaults here are permissive for library use and tests;
    # the commands make the operator choose keys or --no-auth, TLS or --plaintext.
    # api_keys: the keys file (security/auth.py); None turns authentication off.
    api_keys: Path | None = setting(
        None, flag="--api-keys", metavar="FILE",
        alternative=("--no-auth", "no authentication on HTTP and gRPC (trusted networks only)"),
        why="gateway.auth.enabled: the chart passes keys.yaml of the Secret "
            "gateway.auth.secretName, else --no-auth",
        help="API keys file (YAML/JSON, hashed keys and scopes; re-read when it changes); see "
             "`bedside keys new`")
    # HTTP and gRPC listeners serve TLS with tls_cert/tls_key (tls_ca: client certificates,
    # optional on HTTP, required on gRPC); DIMSE uses DICOM TLS with them unless dicom_tls is
    # False.
    http_tls: bool = setting(
        False, flag="--plaintext", command_default=True,
        why="the commands make plaintext an explicit choice; the chart passes --plaintext "
            "unless gateway.tls.enabled (TLS then ends at the ingress)",
        help="HTTP and gRPC without TLS (required unless --tls-cert/--tls-key are given; with "
             "them, only DIMSE keeps TLS)")
    dicom_tls: bool = setting(
        True, flag="--dicom-plaintext",
        why="the chart passes --dicom-plaintext when gateway.tls.enabled and not "
            "gateway.dicomTls.enabled",
        help="DIMSE without TLS even though --tls-cert/--tls-key are given")
    # Source networks (CIDR) allowed on HTTP and gRPC; empty allows every address.
    allowed_sources: tuple[str, ...] = setting(
        (), flag="--allowed-source", metavar="CIDR", chart="gateway.allowedSources",
        help="source network allowed on HTTP and gRPC (repeatable; none given: any)")
    # Per-principal token bucket (requests per second, burst); 0 turns it off.
    rate_limit_per_s: float = setting(
        0.0, flag="--rate-limit", command_default=50.0, chart="gateway.rateLimit.perSecond",
        why="off for library use and tests; on for the commands",
        help="requests per second per API key / client certificate (0: off)")
    rate_limit_burst: float = setting(
        1.0, flag="--rate-burst", command_default=100.0, chart="gateway.rateLimit.burst",
        why="unused while the rate limit is off (the library default)",
        help="requests a key may send at once before --rate-limit applies")
    # Concurrent infer/submit calls over HTTP and gRPC; 0 means no cap.
    max_concurrent_requests: int = setting(
        0, flag="--max-concurrent", command_default=64, chart="gateway.maxConcurrent",
        why="no cap for library use and tests; capped for the commands",
        help="infer/submit calls in progress at once over HTTP and gRPC; more get 503 / "
             "RESOURCE_EXHAUSTED (0: no cap)")
    # HTTP connection limits (security/connections.py): the request head must arrive within
    # http_header_timeout_s of the connection (or of the previous response); a body may pause
    # at most http_body_timeout_s; an idle keep-alive connection closes after
    # http_keep_alive_s; one source address may hold max_connections_per_source connections.
    # The gRPC listener closes a connection that has not completed its TLS handshake and HTTP/2
    # preface within http_header_timeout_s (grpc.server_handshake_timeout_ms).
    http_header_timeout_s: float = setting(
        10.0, flag="--http-header-timeout", metavar="SECONDS",
        chart="gateway.httpConnections.headerTimeoutSeconds",
        help="an HTTP request head (request line and headers) must be complete this long after "
             "the connection opens or the previous response ends, else 408 and closed; also "
             "the gRPC listener's handshake deadline")
    http_body_timeout_s: float = setting(
        30.0, flag="--http-body-timeout", metavar="SECONDS",
        chart="gateway.httpConnections.bodyTimeoutSeconds",
        help="longest pause while an HTTP request body arrives; else 408 and closed")
    http_keep_alive_s: float = setting(
        5.0, flag="--http-keep-alive", metavar="SECONDS",
        chart="gateway.httpConnections.keepAliveSeconds",
        help="an HTTP connection idle this long between requests is closed")
    max_connections_per_source: int = setting(
        64, flag="--max-connections-per-source",
        chart="gateway.httpConnections.maxPerSource",
        help="open HTTP connections one source address may hold; beyond, 429 and closed (0: no "
             "cap; behind a proxy the source is the proxy)")
    # Audit trail: JSON lines appended to this file ("-": standard output) and/or sent to
    # syslog (host:port over UDP, or a socket path such as /dev/log).
    audit_log: Path | None = setting(
        None, flag="--audit-log", metavar="FILE", chart="gateway.audit.log", chart_default="-",
        why="in a container the audit trail goes to stdout, apart from the log on stderr, "
            "where the runtime's log shipper collects it",
        help="append the audit trail (JSON lines) to FILE; '-' for stdout (default: the log)")
    audit_syslog: str | None = setting(
        None, flag="--audit-syslog", metavar="HOST:PORT|SOCKET", chart="gateway.audit.syslog",
        help="also send audit records to syslog (UDP host:port or /dev/log)")

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
        if self.max_associations_per_ae < 0:
            raise ConfigError("max_associations_per_ae must be >= 0 (0 = no per-AE limit)")
        if self.association_lifetime_s < 0:
            raise ConfigError("association_lifetime_s must be >= 0 (0 = no cap)")
        if self.max_association_bytes < 0:
            raise ConfigError("max_association_bytes must be >= 0 (0 = no limit)")
        if self.processes < 0:
            raise ConfigError("processes must be >= 0 (0 = one per CPU given)")
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
        try:
            self.job_table.check()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.job_lease_s < 1:
            raise ConfigError("job_lease_s must be >= 1 second")
        if self.routes_file is not None and not self.routes_file.is_file():
            raise ConfigError(f"routes_file {self.routes_file} is not a file")
        if self.triton_breaker_failures < 1 or self.triton_breaker_cooldown_s <= 0:
            raise ConfigError("triton_breaker_failures must be >= 1 and "
                              "triton_breaker_cooldown_s > 0")
        self._check_security()
        self.version_settings()  # ConfigError when malformed
        for name in (self.model_name, *(m for m in self.models if m != "*")):
            if not (self.model_repository / name / "manifest.json").is_file():
                raise ConfigError(
                    f"no manifest.json for model {name!r} in {self.model_repository}")

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
        for name in ("http_header_timeout_s", "http_body_timeout_s", "http_keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.max_connections_per_source < 0:
            raise ConfigError("max_connections_per_source must be >= 0 (0 = no cap)")

    @property
    def job_table(self) -> DbTarget:
        return DbTarget(self.job_db, self.job_db_password_file)

    @property
    def manifest_path(self) -> Path:
        return self.model_repository / self.model_name / "manifest.json"

    def version_settings(self) -> dict[str, tuple[int | None, int | None, float]]:
        """Per model named by --shadow/--canary: (shadow version, canary version, share)."""
        out: dict[str, tuple[int | None, int | None, float]] = {}
        for text in self.shadow_versions:
            name, version = _model_version(text, "shadow")
            shadow, canary, share = out.get(name, (None, None, 0.0))
            if shadow is not None:
                raise ConfigError(f"shadow: two shadow versions of {name}")
            out[name] = (int(version), canary, share)
        for text in self.canary_versions:
            name, rest = _model_version(text, "canary")
            version, _, share_text = rest.partition(":")
            try:
                share = float(share_text)
            except ValueError:
                share = -1.0
            if not version.isdigit() or not 0.0 <= share <= 1.0:
                raise ConfigError(f"canary {text!r}: MODEL=VERSION:SHARE, SHARE from 0 to 1")
            shadow, canary, _ = out.get(name, (None, None, 0.0))
            if canary is not None:
                raise ConfigError(f"canary: two canary versions of {name}")
            out[name] = (shadow, int(version), share)
        return out

    @property
    def served_models(self) -> tuple[str, ...]:
        """Every model served, the default model first: ``model_name``, then ``models`` in
        order ("*": every folder of the repository with a manifest.json, by name)."""
        names = [self.model_name]
        for name in self.models:
            found = ([p.parent.name for p in sorted(self.model_repository.glob("*/manifest.json"))]
                     if name == "*" else [name])
            names.extend(n for n in found if n not in names)
        return tuple(names)

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


def _model_version(text: str, what: str) -> tuple[str, str]:
    name, sep, version = text.partition("=")
    if not sep or not name or not version:
        raise ConfigError(f"{what} {text!r}: expected MODEL=VERSION")
    if what == "shadow" and not (version.isdigit() and int(version) >= 1):
        raise ConfigError(f"shadow {text!r}: VERSION must be a number >= 1")
    return name, version


_REQUIRED = frozenset(f.name for f in dataclasses.fields(GatewayConfig)
                      if f.default is dataclasses.MISSING)


def settings() -> list[tuple[str, Setting]]:
    """(field name, declaration) of every ``GatewayConfig`` field, in declaration order."""
    return [(f.name, f.metadata[SETTING]) for f in dataclasses.fields(GatewayConfig)]


def _value_type(name: str) -> tuple[type, bool]:
    """(element type, repeatable) of a field: ``Path | None`` -> Path; tuple[str, ...] -> str."""
    hint = typing.get_type_hints(GatewayConfig)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def command_default(name: str, spec: Setting) -> Any:
    """The setting's value when its flag is not given to the command."""
    if spec.command_default is not SAME:
        return spec.command_default
    default = next(f.default for f in dataclasses.fields(GatewayConfig) if f.name == name)
    return None if default is dataclasses.MISSING else default


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the flag of every setting that ``command`` ("gateway" or "serve") takes."""
    for name, spec in settings():
        if command not in spec.commands:
            continue
        kind, repeatable = _value_type(name)
        target: Any = parser
        if spec.alternative is not None:
            target = parser.add_mutually_exclusive_group(required=True)
        default = command_default(name, spec)
        if kind is bool:  # the flag turns the default off: --plaintext, --dicom-plaintext
            target.add_argument(spec.flag, action="store_true", help=spec.help or None)
        elif repeatable:
            target.add_argument(spec.flag, action="append", default=[],
                                metavar=spec.metavar, help=spec.help or None)
        else:
            required = name in _REQUIRED and spec.command_default is SAME
            target.add_argument(spec.flag, type=None if kind is str else kind, default=default,
                                required=required, choices=spec.choices, metavar=spec.metavar,
                                help=spec.help or None)
        if spec.alternative is not None:
            alt_flag, alt_help = spec.alternative
            target.add_argument(alt_flag, action="store_true", help=alt_help)


def _absolute(path: Path) -> Path:
    return path if str(path) == "-" else path.absolute()  # "-": standard output (audit_log)


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``GatewayConfig`` keyword arguments from a command line parsed by ``add_flags``' flags
    (only the settings whose flag the command has)."""
    out: dict[str, Any] = {}
    for name, spec in settings():
        if not hasattr(args, spec.dest):
            continue
        value = getattr(args, spec.dest)
        kind, repeatable = _value_type(name)
        if kind is bool:
            value = not command_default(name, spec) if value else command_default(name, spec)
        elif repeatable:
            value = tuple(value)
        elif kind is Path and value is not None:
            value = _absolute(value)
        out[name] = value
    return out


@dataclass(frozen=True)
class DbTarget:
    """Where the job table lives: ``url`` "sqlite" (beside the spool) or a ``postgresql://``
    URL without a password; the password read from ``password_file`` or ``$PASSWORD_ENV``."""

    url: str = SQLITE
    password_file: Path | None = None
    # PostgreSQL only: the schema holding this job table ("": the database's default). Each
    # further served model has its own (``for_model``), as on SQLite each has its own file.
    schema: str = ""

    @property
    def dialect(self) -> str:
        return SQLITE if self.url == SQLITE else POSTGRESQL

    def for_model(self, name: str) -> DbTarget:
        """The job table of another served model: on PostgreSQL its own schema in the same
        database; on SQLite the same setting (the file lives in that model's spool folder)."""
        if self.url == SQLITE:
            return self
        return dataclasses.replace(self, schema=f"model_{name}"[:63])

    def check(self) -> None:
        """Raise ValueError with a clear message when the target cannot be right."""
        if self.url == SQLITE:
            if self.password_file is not None:
                raise ValueError("a job-table password file needs a postgresql:// URL")
            return
        parts = urlsplit(self.url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("job table: 'sqlite' or a postgresql://USER@HOST:PORT/DB URL "
                             f"(scheme {parts.scheme!r} is neither)")
        if parts.password is not None:
            raise ValueError("job table URL carries a password: give it in a file "
                             f"(--job-db-password-file) or ${PASSWORD_ENV} instead")
        if not (parts.hostname or "host=" in parts.query) or not parts.path.strip("/"):
            raise ValueError("job table URL needs a host and a database name")
        if self.password_file is not None and not self.password_file.is_file():
            raise ValueError(f"job table password file {self.password_file} is not a file")

    def password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip()
        return os.environ.get(PASSWORD_ENV) or None

    def redacted(self) -> str:
        """The URL as it may be logged (no user, no password)."""
        if self.url == SQLITE:
            return SQLITE
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname or ''}:{parts.port or 5432}{parts.path}"
