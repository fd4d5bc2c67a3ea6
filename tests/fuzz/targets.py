"""The code paths fuzzed, as the gateway runs them, with tight limits so that a bound that is
not honoured shows up as a memory failure instead of needing gigabytes to notice."""

from __future__ import annotations

from optimizer.contract.preprocess import PixelLimits
from services.gateway.dicom.parsing import parse
from services.gateway.edges import multipart
from services.gateway.errors import BadRequest, GatewayError
from services.gateway.inference.core import InferenceCore, Result
from services.gateway.intake.ingest import with_preamble
from tests.conftest import TINY_MANIFEST
from tests.fuzz.bounds import within_memory
from tests.gateway.fakes import FakeInferer

LIMITS = PixelLimits(max_decoded_bytes=4 << 20, max_pixels_per_frame=1 << 20)
MAX_INFLATED = 8 << 20
# Every input stays under this (inputs are kilobytes; decoded pixels at most LIMITS, as float32
# model input and its intermediates a few times that).
MEMORY_BOUND = 96 << 20
MAX_PARTS = 16


def dicom_pipeline(data: bytes) -> Result:
    """Bytes as an HTTP edge receives them -> parse -> header checks -> decode, preprocess,
    infer (fake inferer) -> findings. Raises GatewayError for bad input, nothing else."""
    core = InferenceCore(TINY_MANIFEST, FakeInferer(), LIMITS)

    def run() -> Result:
        ds = parse(with_preamble(data), max_inflated_bytes=MAX_INFLATED)
        core.check(ds)
        return core.analyze(ds)

    return within_memory(MEMORY_BOUND, run)


def stow_body(content_type: str, body: bytes) -> list[multipart.Part]:
    """What the STOW-RS edge does with a request's Content-Type and body."""

    def run() -> list[multipart.Part]:
        media, params = multipart.parse_media_type(content_type)
        if media != "multipart/related" or "boundary" not in params:
            raise BadRequest("not multipart/related with a boundary", "media_type")
        return multipart.split(body, params["boundary"], MAX_PARTS)

    return within_memory(MEMORY_BOUND, run)


DECLARED = (GatewayError,)
