"""Replays tests/fuzz_corpus: inputs that once crashed, hung or exhausted memory (or that pin
down a limit), each named ``<expected>--<what it is>.<ext>[.gz]`` where ``expected`` is
``ok`` or the GatewayError reason it must end in. Multipart files hold the request's
Content-Type on their first line and the body after it."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest

from services.gateway.errors import GatewayError
from tests.fuzz.targets import dicom_pipeline, stow_body

TIME_BOUND_S = 2.0  # as the fuzzers' deadline
CORPUS = Path(__file__).resolve().parents[1] / "fuzz_corpus"


def _cases(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).glob("*--*"))


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _expected(path: Path) -> str:
    return path.name.split("--", 1)[0]


def test_corpus_is_not_empty() -> None:
    assert _cases("dicom") and _cases("multipart")


@pytest.mark.parametrize("path", _cases("dicom"), ids=lambda p: p.name)
def test_dicom_corpus(path: Path) -> None:
    data = _read(path)
    start = time.perf_counter()
    try:
        dicom_pipeline(data)
        outcome = "ok"
    except GatewayError as exc:
        outcome = exc.reason
    assert outcome == _expected(path)
    assert time.perf_counter() - start < TIME_BOUND_S


@pytest.mark.parametrize("path", _cases("multipart"), ids=lambda p: p.name)
def test_multipart_corpus(path: Path) -> None:
    ctype, _, body = _read(path).partition(b"\n")
    try:
        stow_body(ctype.decode("latin-1"), body)
        outcome = "ok"
    except GatewayError as exc:
        outcome = exc.reason
    assert outcome == _expected(path)
