"""Fixtures for the integration tests (real peers on free loopback ports)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.peers import STORESCU, Triton


@pytest.fixture
def triton(optimized: Path, tmp_path: Path) -> Iterator[Triton]:
    if not os.access(STORESCU, os.X_OK):
        pytest.fail(f"{STORESCU} missing: install Debian dcmtk (scripts/dev.sh setup as root)")
    server = Triton(optimized / "repository", tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
