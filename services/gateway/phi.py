"""How patient identifiers may appear outside the data: as short, stable hashes, and never
through a library's log records (``quiet_identifier_quoting_loggers``).

A leaf (standard library only), so that the audit log, the stores and the inference core can all
use it without importing one another.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final


def uid_hash(uid: str) -> str:
    """A short, stable stand-in for a UID in logs (UIDs can identify patients)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


# Libraries whose log records quote identifiers (UIDs, element values) at these levels and
# below: pydicom (warnings about values), pynetdicom (INFO/DEBUG dump DIMSE messages),
# highdicom (INFO "copy Patient-related attributes from dataset <UID>" whenever an SR or SEG
# is built). Each is kept at the level given, whatever the root logger's level (``-v``).
QUOTING_LOGGERS: Final[Mapping[str, int]] = MappingProxyType({
    "pydicom": logging.ERROR, "pynetdicom": logging.WARNING, "highdicom": logging.WARNING})


def quiet_identifier_quoting_loggers() -> None:
    """Keep ``QUOTING_LOGGERS`` above the levels where they quote identifiers (idempotent;
    the CLI calls it when it sets up logging, the gateway again when it starts)."""
    for name, level in QUOTING_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
