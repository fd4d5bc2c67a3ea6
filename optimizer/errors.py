"""Errors raised by the optimizer and by the shared preprocessing core.

Each protocol edge (CLI, gateway REST/DIMSE) maps these to its own codes in one table;
nothing below the edges formats user-facing statuses.
"""

from __future__ import annotations


class BedsideError(Exception):
    """Base class for every error Bedside raises on purpose."""


class ManifestError(BedsideError):
    """The model manifest is missing, malformed or inconsistent."""


class CheckpointError(BedsideError):
    """A model checkpoint cannot be loaded."""


class DatasetError(BedsideError):
    """A labelled DICOM folder (calibration, validation, training) is unusable."""


class PreprocessError(BedsideError):
    """A DICOM instance cannot be turned into a model input (bad pixels, wrong modality...)."""


class ExportError(BedsideError):
    """The PyTorch model could not be exported to a valid ONNX graph."""


class QuantizationError(BedsideError):
    """A precision variant could not be produced."""


class SelectionError(BedsideError):
    """No variant passed verification, so nothing can be deployed."""


class TuneError(BedsideError):
    """Tuning could not run, or found no configuration within the latency budget."""
