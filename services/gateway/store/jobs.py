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

States: ``received`` -> ``inferred`` | ``failed`` | ``skipped`` (its series was not selected by
the manifest's rules; ``error`` says which rule) -> ``delivered`` (``mark_delivered``, called by
the delivery side once a destination confirmed; from inferred or failed only). The worker is done
with a job at any state but ``received``.

Groups (processing/): a series- or study-level group has a row in ``groups`` (open -> closed)
and its jobs name it in ``group_key``; an open group's jobs stay ``received`` until it closes,
so the group survives a restart. Pruning deletes rows in a final state older than the retention,
never rows of a group that is still open.

Schema changes are migrations: an older table (states received/inferred/failed, no group
columns) is rebuilt in one transaction on open, its rows kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from services.gateway.phi import uid_hash
from services.gateway.store.durable import DurableDb

LOG = logging.getLogger(__name__)
RECEIVED, INFERRED, FAILED = "received", "inferred", "failed"
SKIPPED, DELIVERED = "skipped", "delivered"
STATES = (RECEIVED, INFERRED, FAILED, SKIPPED, DELIVERED)
FINISHED = (INFERRED, FAILED, SKIPPED)  # what the worker finishes a job with
FINAL = (INFERRED, FAILED, SKIPPED, DELIVERED)  # nothing left for the worker to do
OPEN, CLOSED = "open", "closed"

_JOBS = """
CREATE TABLE IF NOT EXISTS {table} (
    name        TEXT PRIMARY KEY,      -- spool file name (not a UID)
    study_hash  TEXT NOT NULL,
    series_hash TEXT NOT NULL,
    sop_hash    TEXT NOT NULL,
    protocol    TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN
                    ('received', 'inferred', 'failed', 'skipped', 'delivered')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    updated_at  REAL NOT NULL,
    error       TEXT,
    group_key   TEXT,                  -- series/study group (grouping.group_key); NULL: none
    calling_aet TEXT                   -- DIMSE calling AE title; NULL for HTTP edges
)"""
_SCHEMA = _JOBS.format(table="jobs") + """;
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_hash, state);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_group ON jobs (group_key);
CREATE TABLE IF NOT EXISTS groups (
    key         TEXT PRIMARY KEY,      -- grouping.group_key: no UID
    level       TEXT NOT NULL,
    study_hash  TEXT NOT NULL,
    series_hash TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    opened_at   REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS groups_state ON groups (state);
"""
_COLUMNS = ("name, study_hash, series_hash, sop_hash, protocol, state, attempts, received_at,"
            " updated_at, error, group_key, calling_aet")
_V1_COLUMNS = ("name, study_hash, series_hash, sop_hash, protocol, state, attempts,"
               " received_at, updated_at, error")


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
    group_key: str | None = None
    calling_aet: str | None = None


@dataclass(frozen=True)
class GroupRow:
    key: str
    level: str
    study_hash: str
    series_hash: str
    state: str
    opened_at: float
    updated_at: float


def _hash(uid: str) -> str:
    return uid_hash(uid) if uid else ""


class JobTable(DurableDb):
    """Thread-safe (one connection, one lock): DIMSE threads, HTTP threads and the worker
    share it. Every method is one transaction."""

    FILE = "jobs.sqlite3"

    def __init__(self, spool_root: Path) -> None:
        super().__init__(spool_root / self.FILE, "job table")
        self._migrate()
        self._db.executescript(_SCHEMA)

    def _migrate(self) -> None:
        """Rebuild a table of the first schema (no skipped/delivered states, no group columns)
        in one transaction, keeping its rows."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)").fetchall()}
        if not cols or "group_key" in cols:
            return
        with self._tx() as db:
            db.execute(_JOBS.format(table="jobs_v2"))
            db.execute(f"INSERT INTO jobs_v2 ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM jobs")
            db.execute("DROP TABLE jobs")
            db.execute("ALTER TABLE jobs_v2 RENAME TO jobs")
        LOG.info("job table %s migrated to the grouping schema", self.path.name)

    def insert(self, name: str, study_uid: str, series_uid: str, sop_uid: str,
               protocol: str, calling_aet: str | None = None) -> None:
        """A newly spooled instance, state ``received``. Idempotent on ``name``."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (name, study_hash, series_hash, sop_hash, protocol,"
                " state, attempts, received_at, updated_at, calling_aet)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (name, _hash(study_uid), _hash(series_uid), _hash(sop_uid), protocol, RECEIVED,
                 now, now, calling_aet))

    def get(self, name: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE name = ?",
                                   (name,)).fetchone()
        return JobRow(*row) if row is not None else None

    def all(self) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY name").fetchall()
        return [JobRow(*r) for r in rows]

    def attempt(self, name: str, error: str | None = None) -> None:
        """Count one inference attempt (before the call); ``error`` notes why the previous one
        did not finish (e.g. ``triton_unavailable``)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET attempts = attempts + 1, updated_at = ?,"
                       " error = COALESCE(?, error) WHERE name = ?", (time.time(), error, name))

    def finish(self, name: str, state: str, error: str | None = None) -> bool:
        """``received`` -> ``state`` (inferred, failed or skipped), once: False when the row
        was already final (or unknown), so a second transition is never made."""
        return self.finish_many([name], state, error) == 1

    def finish_many(self, names: Iterable[str], state: str, error: str | None = None) -> int:
        """``finish`` for several jobs in one transaction (a series inferred as one item);
        how many rows made the transition."""
        if state not in FINISHED:
            raise ValueError(f"not a final state: {state}")
        done = 0
        with self._tx() as db:
            for name in names:
                cur = db.execute("UPDATE jobs SET state = ?, error = ?, updated_at = ?"
                                 " WHERE name = ? AND state = ?",
                                 (state, error, time.time(), name, RECEIVED))
                done += cur.rowcount
        return done

    def mark_delivered(self, names: Iterable[str]) -> None:
        """``inferred``/``failed`` -> ``delivered`` for these jobs, in one transaction: a
        destination confirmed their results. Idempotent; other states are left as they are."""
        now = time.time()
        with self._tx() as db:
            for name in names:
                db.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE name = ? AND"
                           " state IN (?, ?)", (DELIVERED, now, name, INFERRED, FAILED))

    def open_group(self, key: str, level: str, study_hash: str, series_hash: str,
                   names: Iterable[str]) -> None:
        """Record the group (once) and make these jobs its members, in one transaction."""
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO groups (key, level, study_hash, series_hash,"
                       " state, opened_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (key, level, study_hash, series_hash, OPEN, now, now))
            for name in names:
                db.execute("UPDATE jobs SET group_key = ? WHERE name = ?", (key, name))

    def join_groups(self, entries: Iterable[tuple[str, str, str, str, str]]) -> None:
        """``open_group`` for many arrivals in one transaction: (key, level, study hash,
        series hash, job name) each."""
        now = time.time()
        with self._tx() as db:
            for key, level, study_hash, series_hash, name in entries:
                db.execute("INSERT OR IGNORE INTO groups (key, level, study_hash, series_hash,"
                           " state, opened_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (key, level, study_hash, series_hash, OPEN, now, now))
                db.execute("UPDATE jobs SET group_key = ? WHERE name = ?", (key, name))

    def close_group(self, key: str) -> None:
        """The group was handed on (or had nothing to hand on): closed for good."""
        with self._tx() as db:
            db.execute("UPDATE groups SET state = ?, updated_at = ? WHERE key = ?",
                       (CLOSED, time.time(), key))

    def groups(self, state: str = OPEN) -> list[GroupRow]:
        with self._lock:
            rows = self._db.execute("SELECT key, level, study_hash, series_hash, state,"
                                    " opened_at, updated_at FROM groups WHERE state = ?"
                                    " ORDER BY opened_at, key", (state,)).fetchall()
        return [GroupRow(*r) for r in rows]

    def members(self, key: str) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE group_key = ?"
                                    " ORDER BY name", (key,)).fetchall()
        return [JobRow(*r) for r in rows]

    def prune(self, retention_s: float, keep: Collection[str] = ()) -> int:
        """Delete rows in a final state not updated for ``retention_s`` seconds, except the
        jobs named in ``keep`` (their spool files still exist) and members of open groups;
        then closed groups left without members. How many job rows went."""
        cutoff = time.time() - retention_s
        marks = ", ".join("?" * len(FINAL))
        with self._tx() as db:
            names = [n for (n,) in db.execute(
                f"SELECT name FROM jobs WHERE state IN ({marks}) AND updated_at < ? AND"
                " (group_key IS NULL OR group_key NOT IN"
                " (SELECT key FROM groups WHERE state = ?))",
                (*FINAL, cutoff, OPEN)).fetchall() if n not in keep]
            for name in names:
                db.execute("DELETE FROM jobs WHERE name = ?", (name,))
            db.execute("DELETE FROM groups WHERE state = ? AND updated_at < ? AND key NOT IN"
                       " (SELECT group_key FROM jobs WHERE group_key IS NOT NULL)",
                       (CLOSED, cutoff))
        if names:
            LOG.info("pruned %d finished jobs older than %.0f s", len(names), retention_s)
        return len(names)

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
