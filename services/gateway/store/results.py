"""Durable result store: one JSON file per instance, written before its job is finished.

Results are what the JSON study API and the OIP edges read back, and what start-up recovery
checks to tell a finished job from an unfinished one. Files are named by hashed UIDs only.

Two namespaces, so that a direct answer can never take the place of a job's result: the spool
worker's results (each naming its job, read back by the runner to hand the group on and by
recovery) and the results of direct inference (REST ``/v1/infer``, OIP infer), kept only to be
read back by callers. A direct result written between a job's save and its group's hand-off
would otherwise replace the job's result, and the group would close without its SR/SEG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.gateway.phi import uid_hash
from services.gateway.store.durable import remove_stale_temporaries
from services.gateway.store.spool import durable_mkdir, write_durably


class ResultStore:
    """One JSON file per instance (or per series, for a series result) and producer:

    - ``results/<study hash>/<SOP hash>.json``: the spool worker's results. Each carries the
      name of the job (spool file) or group that produced it under ``_job`` (not shown to
      callers): at start-up that tells "this job's result is already stored" from "an earlier
      copy of the same instance was", so a job is never inferred twice and a resent instance is
      still inferred again.
    - ``results-direct/<study hash>/<SOP hash>.json``: results of direct inference, which
      answered their caller already; created on the first one.

    Readers of a study get one result per instance: the worker's where there is one, else the
    direct one (the same model on the same instance)."""

    JOB_KEY = "_job"

    def __init__(self, root: Path) -> None:
        self.root = root / "results"
        self.direct = root / "results-direct"
        durable_mkdir(self.root)
        # A write stopped by a crash leaves its own temporary file (never the result: the
        # rename did not happen); other gateway processes of the pod may be writing now, so
        # only old ones are stale.
        remove_stale_temporaries((*self.root.glob("*/*.tmp"), *self.direct.glob("*/*.tmp")))

    def save(self, study_uid: str, sop_uid: str, result: dict[str, Any],
             job: str | None = None) -> None:
        """Durable (fsynced file and directory) before it returns. ``job``: the job or group
        that produced it (the worker); None for direct inference, which goes to the direct
        namespace and so never replaces a job's result. Safe under any concurrency and
        idempotent per instance: writers of the same instance in one namespace (the same file
        sent over REST and DIMSE at once) each write a temporary file of their own and rename
        it over the one result file, so one whole result stays."""
        if job is None:
            durable_mkdir(self.direct)
        folder = (self.root if job is not None else self.direct) / uid_hash(study_uid)
        durable_mkdir(folder)
        doc = {**result, self.JOB_KEY: job} if job is not None else result
        write_durably(folder / f"{uid_hash(sop_uid)}.json",
                       json.dumps(doc, sort_keys=True).encode("utf-8"))

    def stored(self, study_hash: str, sop_hash: str) -> dict[str, Any] | None:
        """The worker's stored result document (``_job`` included) for these hashed UIDs, if
        any (direct results are not jobs' results)."""
        if not study_hash or not sop_hash:
            return None
        try:
            doc = json.loads((self.root / study_hash / f"{sop_hash}.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def for_study(self, study_uid: str) -> list[dict[str, Any]]:
        """One result per instance (or series) of the study: the worker's, else the direct."""
        study = uid_hash(study_uid)
        files = {p.name: p for p in (self.direct / study).glob("*.json")}
        files.update({p.name: p for p in (self.root / study).glob("*.json")})  # jobs' first
        results = [json.loads(files[name].read_text(encoding="utf-8")) for name in sorted(files)]
        return [{k: v for k, v in r.items() if k != self.JOB_KEY} for r in results
                if r.get("study_instance_uid") == study_uid]
