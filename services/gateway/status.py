"""The one status table: every gateway error class -> what each protocol answers.

One row per class in ``services.gateway.errors``: the HTTP status (REST, OIP REST, STOW-RS
request-level errors), the gRPC code (OIP gRPC), the DIMSE C-STORE status, the STOW-RS
FailureReason (0008,1197) of one refused part, and whether a Retry-After goes with it. Edges
keep only the shape of their error bodies and look statuses up here; no edge holds a status of
its own. ``tests/gateway/test_status.py`` fails when an error class has no row.

Choices that are not obvious:
- ``InferenceFailed`` is HTTP 502 on every HTTP edge (REST and OIP REST alike): Triton, the
  server behind this gateway, failed the request; a 500 is kept for the gateway's own bugs
  (the REST edge's internal-error handler), so the two stay apart in dashboards and alerts.
  gRPC: INTERNAL (not UNAVAILABLE, which clients retry).
- Retry-After: ``Unavailable`` (Triton or the spool cannot take work) answers 503 with a fixed
  ``RETRY_AFTER_S``, because the gateway cannot know when Triton is back; rate limits and the
  concurrency cap carry their own ``retry_after_s`` (429 and 503), rounded up to whole seconds.
  gRPC has no header: the message says when to retry.
- DIMSE statuses follow PS3.4 Annex B.2.3 (0xA700 out of resources, 0xA900 data set does not
  match SOP class, 0xC000 cannot understand, 0x0122 SOP class not supported); STOW-RS uses
  the same codes for a part (PS3.18 10.5.3), 0x0110 (processing failure) where nothing more
  precise applies. Authentication is refused at association on DIMSE (AE-title allowlist), so
  its C-STORE status (0x0124, refused: not authorised) is there for completeness.
- ``NotForModel`` (an image the served model does not take: its manifest's modalities,
  photometric interpretation, bit depth) answers 0xC001 on DIMSE and STOW-RS, one code of the
  C-STORE "cannot understand" range (0xCxxx) that PS3.4 B.2.3 leaves to the implementation:
  the instance is a well-formed image of a class the gateway takes, so neither 0x0122 (SOP
  class not supported) nor 0xC000 (what an unreadable instance answers) would tell the PACS
  administrator what happened. HTTP 400 and INVALID_ARGUMENT, as before.
- ``DeliveryFailed``, ``DeliveryRejected`` (raised by destinations) and ``DicomResultError``
  (building an SR or SEG) happen on the way out; no edge answers with them today, their rows
  say what one would.

A leaf: it imports only ``errors`` (and grpc for its code enum), so the guard and every edge
can use it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import grpc

from services.gateway.errors import (
    BadRequest,
    DeliveryFailed,
    DeliveryRejected,
    DicomResultError,
    Forbidden,
    GatewayError,
    InferenceFailed,
    InvalidInstance,
    MissingPixelData,
    NotForModel,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    SOPClassMismatch,
    Unauthenticated,
    Unavailable,
    UnsupportedInstance,
    UnsupportedMediaType,
    UnsupportedSOPClass,
    WrongStudy,
)

RETRY_AFTER_S = 5  # when the gateway cannot tell how long a dependency stays down

# DIMSE / STOW-RS status codes (PS3.4 Annex B.2.3, PS3.7 Annex C).
OUT_OF_RESOURCES = 0xA700
DATA_SET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_FOR_MODEL = 0xC001  # this gateway's code in the 0xCxxx range (see the module docstring)
NOT_AUTHORISED = 0x0124


class RetryAfter(enum.Enum):
    NO = "no"  # no Retry-After: retrying the same request does not help
    FIXED = "fixed"  # RETRY_AFTER_S
    FROM_ERROR = "from_error"  # the error's own ``retry_after_s`` (a ``RateLimited``)


@dataclass(frozen=True)
class Row:
    http: int
    grpc: grpc.StatusCode
    dimse: int
    stow: int
    retry_after: RetryAfter = RetryAfter.NO


_C = grpc.StatusCode
TABLE: Mapping[type[GatewayError], Row] = MappingProxyType({
    # the root: what a new error class would answer until it has its own row
    GatewayError: Row(400, _C.INVALID_ARGUMENT, CANNOT_UNDERSTAND, PROCESSING_FAILURE),
    # the request or the instance is wrong: do not retry it as it is
    BadRequest: Row(400, _C.INVALID_ARGUMENT, CANNOT_UNDERSTAND, PROCESSING_FAILURE),
    UnsupportedMediaType: Row(415, _C.INVALID_ARGUMENT, CANNOT_UNDERSTAND, CANNOT_UNDERSTAND),
    InvalidInstance: Row(400, _C.INVALID_ARGUMENT, CANNOT_UNDERSTAND, CANNOT_UNDERSTAND),
    MissingPixelData: Row(400, _C.INVALID_ARGUMENT, DATA_SET_MISMATCH, DATA_SET_MISMATCH),
    SOPClassMismatch: Row(400, _C.INVALID_ARGUMENT, DATA_SET_MISMATCH, DATA_SET_MISMATCH),
    UnsupportedInstance: Row(400, _C.INVALID_ARGUMENT, CANNOT_UNDERSTAND, CANNOT_UNDERSTAND),
    NotForModel: Row(400, _C.INVALID_ARGUMENT, NOT_FOR_MODEL, NOT_FOR_MODEL),
    UnsupportedSOPClass: Row(400, _C.INVALID_ARGUMENT, SOP_CLASS_NOT_SUPPORTED,
                             SOP_CLASS_NOT_SUPPORTED),
    WrongStudy: Row(400, _C.INVALID_ARGUMENT, CANNOT_UNDERSTAND, DATA_SET_MISMATCH),
    PayloadTooLarge: Row(413, _C.RESOURCE_EXHAUSTED, OUT_OF_RESOURCES, OUT_OF_RESOURCES),
    NotFound: Row(404, _C.NOT_FOUND, CANNOT_UNDERSTAND, PROCESSING_FAILURE),
    # the caller
    Unauthenticated: Row(401, _C.UNAUTHENTICATED, NOT_AUTHORISED, NOT_AUTHORISED),
    Forbidden: Row(403, _C.PERMISSION_DENIED, NOT_AUTHORISED, NOT_AUTHORISED),
    RateLimited: Row(429, _C.RESOURCE_EXHAUSTED, OUT_OF_RESOURCES, OUT_OF_RESOURCES,
                     RetryAfter.FROM_ERROR),
    Overloaded: Row(503, _C.RESOURCE_EXHAUSTED, OUT_OF_RESOURCES, OUT_OF_RESOURCES,
                    RetryAfter.FROM_ERROR),
    # an HTTP client too slow to send its request (the connection is closed after the answer)
    RequestTimeout: Row(408, _C.DEADLINE_EXCEEDED, CANNOT_UNDERSTAND, PROCESSING_FAILURE),
    # Triton, the spool
    Unavailable: Row(503, _C.UNAVAILABLE, OUT_OF_RESOURCES, OUT_OF_RESOURCES, RetryAfter.FIXED),
    InferenceFailed: Row(502, _C.INTERNAL, CANNOT_UNDERSTAND, PROCESSING_FAILURE),
    # destinations (outbound only)
    DeliveryFailed: Row(502, _C.UNAVAILABLE, PROCESSING_FAILURE, PROCESSING_FAILURE),
    DeliveryRejected: Row(502, _C.FAILED_PRECONDITION, PROCESSING_FAILURE, PROCESSING_FAILURE),
    # the gateway's own result building (delivery): a fault here, not the caller's
    DicomResultError: Row(500, _C.INTERNAL, PROCESSING_FAILURE, PROCESSING_FAILURE),
})


def row(exc: GatewayError | type[GatewayError]) -> Row:
    """The row of ``exc``'s class, or of its nearest ancestor that has one."""
    cls = exc if isinstance(exc, type) else type(exc)
    for klass in cls.__mro__:
        found = TABLE.get(klass)
        if found is not None:
            return found
    raise TypeError(f"{cls.__name__} is not a gateway error")


def http_status(exc: GatewayError) -> int:
    return row(exc).http


def grpc_code(exc: GatewayError) -> grpc.StatusCode:
    return row(exc).grpc


def dimse_status(exc: GatewayError) -> int:
    return row(exc).dimse


def stow_failure_reason(exc: GatewayError) -> int:
    return row(exc).stow


def retry_after_header(seconds: float) -> str:
    """HTTP Retry-After takes whole seconds; round up so a retry is never early."""
    return str(max(1, math.ceil(seconds)))


def retry_after_s(exc: GatewayError) -> float | None:
    """Seconds the caller should wait before retrying, or None (no Retry-After)."""
    how = row(exc).retry_after
    if how is RetryAfter.FIXED:
        return RETRY_AFTER_S
    if how is RetryAfter.FROM_ERROR:
        if not isinstance(exc, RateLimited):
            raise TypeError(f"{type(exc).__name__} has no retry_after_s")
        return exc.retry_after_s
    return None


def http_headers(exc: GatewayError) -> dict[str, str]:
    """The status headers every HTTP edge sends with ``exc``: Retry-After, when due."""
    seconds = retry_after_s(exc)
    return {} if seconds is None else {"Retry-After": retry_after_header(seconds)}
