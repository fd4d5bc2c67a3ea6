"""Which version of each model is primary, kept on the spool volume so that a promotion or
rollback made while the gateway runs survives its restart.

One JSON file, ``model_versions.json``, rewritten whole and durably (``write_durably``) on each
change: ``{model: {"primary": int, "previous": int | null}}``. Model names and version numbers
only: nothing about patients.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from services.gateway.store.spool import write_durably

LOG = logging.getLogger(__name__)


class VersionStore:
    FILE = "model_versions.json"

    def __init__(self, root: Path) -> None:
        self.path = root / self.FILE
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, int | None]]:
        """What was saved; empty when nothing was (or the file is unreadable: logged)."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            LOG.error("%s unreadable (%s): primaries from the manifests", self.path.name,
                      type(exc).__name__)
            return {}
        if not isinstance(doc, dict):
            return {}
        out: dict[str, dict[str, int | None]] = {}
        for name, entry in doc.items():
            if isinstance(entry, dict) and isinstance(entry.get("primary"), int):
                previous = entry.get("previous")
                out[str(name)] = {"primary": entry["primary"],
                                  "previous": previous if isinstance(previous, int) else None}
        return out

    def stamp(self) -> tuple[int, int] | None:
        """Changes when the file is rewritten (mtime and inode: each save is a rename)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def save(self, model: str, primary: int, previous: int | None) -> None:
        """Durable before it returns."""
        with self._lock:
            doc = self.load()
            doc[model] = {"primary": primary, "previous": previous}
            write_durably(self.path, json.dumps(doc, sort_keys=True, indent=1).encode())
