"""Durable spool and result store.

An instance is acknowledged (C-STORE success) only after ``Spool.put`` returned: the bytes are
written to a temporary name, fsynced, renamed into ``incoming/`` and the directory fsynced.
A spooled file is removed only after its result is stored, so a restart re-processes whatever
was acknowledged but not finished.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from services.gateway.core import uid_hash


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Spool:
    def __init__(self, root: Path) -> None:
        self.incoming = root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob("*.tmp"):  # never acknowledged: safe to drop
            stale.unlink()

    def put(self, data: bytes) -> Path:
        path = self.incoming / f"{time.time_ns():020d}-{uuid.uuid4().hex}.dcm"
        _write_durably(path, data)
        return path

    def pending(self) -> list[Path]:
        return sorted(self.incoming.glob("*.dcm"))

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)


class ResultStore:
    """One JSON file per instance under ``results/<study hash>/``."""

    def __init__(self, root: Path) -> None:
        self.root = root / "results"
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, study_uid: str, sop_uid: str, result: dict[str, Any]) -> None:
        folder = self.root / uid_hash(study_uid)
        folder.mkdir(exist_ok=True)
        _write_durably(folder / f"{uid_hash(sop_uid)}.json",
                       json.dumps(result, sort_keys=True).encode("utf-8"))

    def for_study(self, study_uid: str) -> list[dict[str, Any]]:
        folder = self.root / uid_hash(study_uid)
        if not folder.is_dir():
            return []
        results = [json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("*.json")]
        return [r for r in results if r.get("study_instance_uid") == study_uid]
