"""Durable spool and result store.

An instance is acknowledged (C-STORE success) only after ``Spool.put`` returned: the bytes are
written to a temporary name, fsynced, renamed into ``incoming/`` and the directory fsynced.
A spooled file leaves ``incoming/`` only after its result (or error result) is stored, so a
restart re-processes whatever was acknowledged but not finished. A file that cannot be
processed at all is moved to ``failed/``, never deleted.
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


def _durable_mkdir(path: Path) -> None:
    """Create ``path`` and make its directory entry durable (fsync the parent)."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    _fsync_dir(path.parent)


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
        _durable_mkdir(root)
        self.root = root
        self.incoming = root / "incoming"
        self.failed = root / "failed"
        _durable_mkdir(self.incoming)
        _durable_mkdir(self.failed)
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

    def quarantine(self, path: Path) -> Path:
        """Keep an acknowledged file that cannot be processed, for a person to look at."""
        target = self.failed / path.name
        os.replace(path, target)
        _fsync_dir(self.failed)
        _fsync_dir(path.parent)
        return target


class ResultStore:
    """One JSON file per instance under ``results/<study hash>/<SOP hash>.json``.

    A result saved by the worker carries the name of the job (spool file) that produced it
    under ``_job`` (not shown to callers): at start-up that tells "this job's result is already
    stored" from "an earlier copy of the same instance was", so a job is never inferred twice
    and a resent instance is still inferred again."""

    JOB_KEY = "_job"

    def __init__(self, root: Path) -> None:
        self.root = root / "results"
        _durable_mkdir(self.root)

    def save(self, study_uid: str, sop_uid: str, result: dict[str, Any],
             job: str | None = None) -> None:
        """Durable (fsynced file and directory) before it returns."""
        folder = self.root / uid_hash(study_uid)
        _durable_mkdir(folder)
        doc = {**result, self.JOB_KEY: job} if job is not None else result
        _write_durably(folder / f"{uid_hash(sop_uid)}.json",
                       json.dumps(doc, sort_keys=True).encode("utf-8"))

    def stored(self, study_hash: str, sop_hash: str) -> dict[str, Any] | None:
        """The stored result document (``_job`` included) for these hashed UIDs, if any."""
        if not study_hash or not sop_hash:
            return None
        try:
            doc = json.loads((self.root / study_hash / f"{sop_hash}.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def for_study(self, study_uid: str) -> list[dict[str, Any]]:
        folder = self.root / uid_hash(study_uid)
        if not folder.is_dir():
            return []
        results = [json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("*.json")]
        return [{k: v for k, v in r.items() if k != self.JOB_KEY} for r in results
                if r.get("study_instance_uid") == study_uid]
