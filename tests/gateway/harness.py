"""A whole gateway on free ports with its Triton edge faked: real sockets, real clients."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.net import free_port
from tests.conftest import TINY_MANIFEST
from tests.gateway.fakes import FakeInferer


def model_repository(tmp: Path) -> Path:
    repo = tmp / "repo"
    (repo / TINY_MANIFEST.name).mkdir(parents=True, exist_ok=True)
    TINY_MANIFEST.save(repo / TINY_MANIFEST.name / "manifest.json")
    return repo


def fake_gateway(tmp: Path, fake: FakeInferer | None = None, **config: Any) -> Gateway:
    """Started; the caller stops it. ``config`` overrides GatewayConfig fields."""
    fields: dict[str, Any] = dict(
        model_repository=model_repository(tmp), model_name=TINY_MANIFEST.name,
        triton_grpc_url="unused:1", spool_dir=tmp / "spool", http_port=free_port(),
        dicom_port=free_port(), grpc_port=free_port(), triton_retry_backoff_s=0.01,
    )
    fields.update(config)
    gateway = Gateway(GatewayConfig(**fields), inferer=fake or FakeInferer())
    gateway.start()
    return gateway


def base_url(gw: Gateway) -> str:
    return f"http://{gw.config.http_host}:{gw.config.http_port}"


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
