"""The root error and the contract's own errors.

Every error Bedside raises on purpose derives from ``BedsideError``; it lives here, in the
torch-free contract, so that the gateway, the CLI and ``bedside deploy`` share one root without
importing the optimizer. Each protocol edge (CLI, gateway REST/DIMSE/gRPC) maps these to its own
codes in one table; nothing below the edges formats user-facing statuses.
"""

from __future__ import annotations


class BedsideError(Exception):
    """Base class for every error Bedside raises on purpose."""


class ManifestError(BedsideError):
    """The model manifest is missing, malformed or inconsistent."""


class PreprocessError(BedsideError):
    """A DICOM instance cannot be turned into a model input (bad pixels, wrong modality...)."""


class UnsupportedTransferSyntax(PreprocessError):
    """The instance's pixels are encoded in a transfer syntax the contract cannot decode."""


class PixelLimitExceeded(PreprocessError):
    """The image (per frame, or decoded as a whole) is larger than the configured limits."""
