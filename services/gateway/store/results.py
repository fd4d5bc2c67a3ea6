"""Durable result store: one JSON file per instance, written before its job is finished.

Results are what the JSON study API and the OIP edges read back, and what start-up recovery
checks to tell a finished job from an unfinished one. Files are named by hashed UIDs only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.gateway.phi import uid_hash
from services.gateway.store.spool import durable_mkdir, write_durably


class ResultStore:
    """One JSON file per instance under ``results/<study hash>/<SOP hash>.json``.

    A result saved by the worker carries the name of the job (spool file) that produced it
    under ``_job`` (not shown to callers): at start-up that tells "this job's result is already
    stored" from "an earlier copy of the same instance was", so a job is never inferred twice
    and a resent instance is still inferred again."""

    JOB_KEY = "_job"

    def __init__(self, root: Path) -> None:
        self.root = root / "results"
        durable_mkdir(self.root)
        # A write stopped by a crash leaves its own temporary file (never the result: the
        # rename did not happen); at start no writer is running, so every one is stale.
        for stale in self.root.glob("*/*.tmp"):
            stale.unlink(missing_ok=True)

    def save(self, study_uid: str, sop_uid: str, result: dict[str, Any],
             job: str | None = None) -> None:
        """Durable (fsynced file and directory) before it returns. Safe under any concurrency
        and idempotent per instance: writers of the same instance (the same file sent over REST
        and DIMSE at once) each write a temporary file of their own and rename it over the one
        result file, so one whole result stays."""
        folder = self.root / uid_hash(study_uid)
        durable_mkdir(folder)
        doc = {**result, self.JOB_KEY: job} if job is not None else result
        write_durably(folder / f"{uid_hash(sop_uid)}.json",
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
