"""Errors of ``bedside deploy``; the CLI prints them as one line and exits 2."""

from __future__ import annotations

from optimizer.contract.errors import BedsideError


class DeployError(BedsideError):
    """The release could not be installed, upgraded, or did not become ready."""


class RepositoryError(DeployError):
    """The model repository does not hold a deployable model."""


class RolloutTimeout(DeployError):
    """A workload or the model did not become ready within the timeout."""
