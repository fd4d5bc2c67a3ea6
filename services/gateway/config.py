"""Gateway configuration: frozen, validated once at start-up."""

from __future__ import annotations

import re
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
    max_associations: int = 8
    max_request_bytes: int = 64 * 1024 * 1024
    # Acknowledged-but-unfinished instances above which C-STORE answers 0xA700 (back-pressure).
    max_spool_depth: int = 1000
    triton_timeout_s: float = 10.0
    triton_retry_backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if not _AE_RE.match(self.ae_title) or self.ae_title != self.ae_title.strip():
            raise ConfigError(f"ae_title {self.ae_title!r}: 1-16 printable characters, no '\\'")
        for name in ("http_port", "dicom_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ConfigError(f"{name} {port} is not a TCP port")
        if self.max_associations < 1:
            raise ConfigError("max_associations must be >= 1")
        if self.max_spool_depth < 1:
            raise ConfigError("max_spool_depth must be >= 1")
        if self.max_request_bytes < 1024:
            raise ConfigError("max_request_bytes must be >= 1024")
        if self.triton_timeout_s <= 0 or self.triton_retry_backoff_s <= 0:
            raise ConfigError("triton timeouts must be > 0")
        if not (self.model_repository / self.model_name / "manifest.json").is_file():
            raise ConfigError(
                f"no manifest.json for model {self.model_name!r} in {self.model_repository}"
            )

    @property
    def manifest_path(self) -> Path:
        return self.model_repository / self.model_name / "manifest.json"
