"""The gateway's errors. What each protocol answers for each of them (HTTP, gRPC, DIMSE,
STOW-RS, Retry-After) is one row of ``services.gateway.status``; a new class needs a row there.

``reason`` is a short, bounded token used as a metric label and in logs; ``str(error)`` is the
message for the caller and never contains patient data.
"""

from __future__ import annotations

from optimizer.contract.errors import BedsideError


class GatewayError(BedsideError):
    """Base class; ``reason`` is a bounded label such as ``no_pixel_data``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidInstance(GatewayError):
    """The bytes are not a readable DICOM instance, or its pixels cannot be used."""


class MissingPixelData(GatewayError):
    """An image SOP class without Pixel Data: the data set does not match its SOP class."""


class SOPClassMismatch(GatewayError):
    """DIMSE only: the data set's SOP Class UID is not the one its C-STORE request announced
    (the presentation context's abstract syntax)."""


class UnsupportedInstance(GatewayError):
    """A well-formed instance this model does not take (non-image SOP class, wrong modality)."""


class UnsupportedSOPClass(UnsupportedInstance):
    """The SOP class is not an image storage class this gateway infers on."""


class NotForModel(UnsupportedInstance):
    """An image this gateway reads, but not an input of the served model per its manifest
    (modality, photometric interpretation, bit depth, frames for a 3-D model)."""


class PayloadTooLarge(GatewayError):
    """The request or instance exceeds the configured size limit."""


class Unavailable(GatewayError):
    """Triton (or the spool) cannot take work right now; the caller should retry later."""


class InferenceFailed(GatewayError):
    """Triton answered with a permanent error for this request (retrying will not help)."""


class NotFound(GatewayError):
    """No result is known for what was asked."""


class BadRequest(GatewayError):
    """The request itself is malformed (bad multipart framing, bad tensor, wrong shape)."""


class UnsupportedMediaType(GatewayError):
    """The request's Content-Type is not one this edge takes."""


class WrongStudy(GatewayError):
    """An instance posted to a study-specific target belongs to another study."""


class DeliveryFailed(GatewayError):
    """A destination did not take a result this time (refused or lost association, timeout,
    out of resources, HTTP 5xx): the outbox retries with backoff."""


class DeliveryRejected(GatewayError):
    """A destination refused a result for good (C-STORE 0xA9xx/0xCxxx, no presentation context
    for its SOP class, HTTP 400/409 with a FailedSOPSequence): straight to dead-letter."""


class DicomResultError(GatewayError):
    """A DICOM result cannot be built from what was given (mismatched sources, mask shape)."""


class Unauthenticated(GatewayError):
    """No credentials, or credentials the gateway does not know (HTTP 401, UNAUTHENTICATED)."""


class Forbidden(GatewayError):
    """Known caller without the scope for this call, or a source address outside the
    allowlist (HTTP 403, PERMISSION_DENIED)."""


class RateLimited(GatewayError):
    """The caller's rate limit is spent; ``retry_after_s`` says when a call is allowed again
    (HTTP 429 + Retry-After, RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, reason: str, retry_after_s: float) -> None:
        super().__init__(message, reason)
        self.retry_after_s = retry_after_s


class Overloaded(RateLimited):
    """The gateway's cap on concurrent work is reached (HTTP 503 + Retry-After,
    RESOURCE_EXHAUSTED)."""


class RequestTimeout(GatewayError):
    """An HTTP client did not send its request head, or the next part of its body, in time
    (HTTP 408; the connection is closed)."""
