"""Errors raised by the optimizer's own steps (checkpoint, data sets, export, variants,
selection, tuning).

The root ``BedsideError`` and the errors of the model contract (``ManifestError``,
``PreprocessError``) live in ``optimizer.contract.errors``. Each protocol edge maps these to its
own codes in one table; nothing below the edges formats user-facing statuses.
"""

from __future__ import annotations

from optimizer.contract.errors import BedsideError


class CheckpointError(BedsideError):
    """A model checkpoint cannot be loaded."""


class DatasetError(BedsideError):
    """A labelled DICOM folder (calibration, validation, training) is unusable."""


class ExportError(BedsideError):
    """The PyTorch model could not be exported to a valid ONNX graph."""


class QuantizationError(BedsideError):
    """A precision variant could not be produced."""


class SelectionError(BedsideError):
    """No variant passed verification, so nothing can be deployed."""


class TuneError(BedsideError):
    """Tuning could not run, or found no configuration within the latency budget."""
