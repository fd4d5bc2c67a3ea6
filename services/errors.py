"""Errors of the services package (launchers, configuration)."""

from __future__ import annotations

from optimizer.contract.errors import BedsideError


class ConfigError(BedsideError):
    """A configuration value is missing or invalid; raised once, at start-up."""


class ServiceError(BedsideError):
    """A service (tritonserver, the gateway) failed to start or stopped unexpectedly."""
