"""How patient identifiers may appear outside the data: as short, stable hashes.

A leaf (standard library only), so that the audit log, the stores and the inference core can all
use it without importing one another.
"""

from __future__ import annotations

import hashlib


def uid_hash(uid: str) -> str:
    """A short, stable stand-in for a UID in logs (UIDs can identify patients)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]
