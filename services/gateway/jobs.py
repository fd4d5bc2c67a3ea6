"""The job table: one row per acknowledged instance, in SQLite (WAL) beside the spool.

Why a table as well as the spool: the spool file says "acknowledged, not finished"; the table
says what happened to it (received -> inferred | failed), how many inference attempts it took,
when, and why it failed, and it answers "is this study still pending?" without reading files.
It holds hashed UIDs only (``uid_hash``), never raw UIDs or other patient data.

Crash consistency (the spool file stays the source of truth for "acknowledged"):

- Ingest: ``Spool.put`` (fsynced) -> ``insert`` (committed) -> acknowledge. A crash between the
  two leaves a spool file without a row; ``reconcile`` at start-up adds the row (protocol
  ``recovered``), so the instance is processed once. Nothing is acknowledged before both.
- Worker: result file written durably, carrying the job's name -> ``finish`` (one transaction,
  ``received`` -> ``inferred``/``failed``, guarded so it happens once) -> spool file removed. A
  crash after the result write but before ``finish`` is found at start-up (the stored result
  names this job): the row is finished without inferring again. A crash after ``finish`` but
  before the removal leaves a spool file whose row is final: it is just removed.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``. In WAL mode NORMAL already survives
a process crash (kill -9), but a power loss or kernel crash may roll back the last commits; FULL
fsyncs the WAL at every commit, so a row that preceded an acknowledgement is on disk as surely
as the spool file is. It costs one fsync per transaction, the same order as the spool's own
fsyncs on the acknowledgement path.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.gateway.core import uid_hash

LOG = logging.getLogger(__name__)
RECEIVED, INFERRED, FAILED = "received", "inferred", "failed"
STATES = (RECEIVED, INFERRED, FAILED)
FINAL = (INFERRED, FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name        TEXT PRIMARY KEY,      -- spool file name (not a UID)
    study_hash  TEXT NOT NULL,
    series_hash TEXT NOT NULL,
    sop_hash    TEXT NOT NULL,
    protocol    TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('received', 'inferred', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    updated_at  REAL NOT NULL,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_hash, state);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
"""


@dataclass(frozen=True)
class JobRow:
    name: str
    study_hash: str
    series_hash: str
    sop_hash: str
    protocol: str
    state: str
    attempts: int
    received_at: float
    updated_at: float
    error: str | None


def _hash(uid: str) -> str:
    return uid_hash(uid) if uid else ""


class JobTable:
    """Thread-safe (one connection, one lock): DIMSE threads, HTTP threads and the worker
    share it. Every method is one transaction."""

    FILE = "jobs.sqlite3"

    def __init__(self, spool_root: Path) -> None:
        self.path = spool_root / self.FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OSError(f"job table {self.path}: WAL mode refused ({mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, name: str, study_uid: str, series_uid: str, sop_uid: str,
               protocol: str) -> None:
        """A newly spooled instance, state ``received``. Idempotent on ``name``."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (name, study_hash, series_hash, sop_hash, protocol,"
                " state, attempts, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (name, _hash(study_uid), _hash(series_uid), _hash(sop_uid), protocol, RECEIVED,
                 now, now))

    def get(self, name: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT name, study_hash, series_hash, sop_hash, protocol,"
                                   " state, attempts, received_at, updated_at, error FROM jobs"
                                   " WHERE name = ?", (name,)).fetchone()
        return JobRow(*row) if row is not None else None

    def all(self) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute("SELECT name, study_hash, series_hash, sop_hash, protocol,"
                                    " state, attempts, received_at, updated_at, error FROM jobs"
                                    " ORDER BY name").fetchall()
        return [JobRow(*r) for r in rows]

    def attempt(self, name: str, error: str | None = None) -> None:
        """Count one inference attempt (before the call); ``error`` notes why the previous one
        did not finish (e.g. ``triton_unavailable``)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET attempts = attempts + 1, updated_at = ?,"
                       " error = COALESCE(?, error) WHERE name = ?", (time.time(), error, name))

    def finish(self, name: str, state: str, error: str | None = None) -> bool:
        """``received`` -> ``state`` (inferred or failed), once: False when the row was already
        final (or unknown), so a second transition is never made."""
        if state not in FINAL:
            raise ValueError(f"not a final state: {state}")
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = ?, error = ?, updated_at = ?"
                             " WHERE name = ? AND state = ?",
                             (state, error, time.time(), name, RECEIVED))
            return cur.rowcount == 1

    def pending(self, study_uid: str) -> int:
        """Instances of the study acknowledged and not finished yet."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE study_hash = ? AND"
                                    " state = ?", (uid_hash(study_uid), RECEIVED)).fetchone()
        return int(n)

    def count(self, state: str) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?",
                                    (state,)).fetchone()
        return int(n)

    def received(self) -> list[JobRow]:
        return [r for r in self.all() if r.state == RECEIVED]
