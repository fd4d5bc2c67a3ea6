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

Shared by several workers (gateway processes in one pod on SQLite, replicas on PostgreSQL;
``jobdb.py`` holds both backends and the versioned migrations): every worker registers an
``owner`` id with a lease it renews (``workers``); the rows it ingests carry its owner. A group
is keyed in the database: at most one ``open`` group per (level, study, series), so an instance
arriving at another process joins the group the first one opened, and the group's ``due_at`` is
the latest member's acknowledgement plus the timeout. Closing is claimed by one conditional
UPDATE (``open`` -> ``closing``, owner set; row locks with SKIP LOCKED on PostgreSQL): exactly
one worker closes a group. Rows and ``closing`` groups of a worker whose lease expired (killed)
are taken over by a live one (``take_over``); live claims are never taken. A worker that only
stalled past its lease learns it from ``heartbeat`` (False), and its finishes and closes, made
with its ``owner``, no longer apply to what was taken over (``finish_many``, ``close_group``). An
arrival whose proposed key names a group no longer open (another worker claimed it meanwhile)
opens a new group under a key named after the arrival.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.gateway.phi import uid_hash
from services.gateway.store.jobdb import SQLITE, Database, DbTarget, migrate, open_database

LOG = logging.getLogger(__name__)
RECEIVED, INFERRED, FAILED = "received", "inferred", "failed"
SKIPPED, DELIVERED = "skipped", "delivered"
STATES = (RECEIVED, INFERRED, FAILED, SKIPPED, DELIVERED)
FINISHED = (INFERRED, FAILED, SKIPPED)  # what the worker finishes a job with
FINAL = (INFERRED, FAILED, SKIPPED, DELIVERED)  # nothing left for the worker to do
OPEN, CLOSING, CLOSED = "open", "closing", "closed"
CLAIMED, LATER, GONE = "claimed", "later", "gone"  # what ``claim_group`` found

_COLUMNS = ("name, study_hash, series_hash, sop_hash, protocol, state, attempts, received_at,"
            " updated_at, error, group_key, calling_aet, owner")
_GROUP_COLUMNS = "key, level, study_hash, series_hash, state, opened_at, updated_at"
_BATCH = 500  # rows one take-over or claim moves at most
_REKEYS = 8  # keys a joining job tries when the proposed one names a group no longer open


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
    owner: str | None = None  # the worker holding it (jobs.py: leases); None: nobody


@dataclass(frozen=True)
class GroupRow:
    key: str
    level: str
    study_hash: str
    series_hash: str
    state: str
    opened_at: float
    updated_at: float


def group_key(level: str, study_hash: str, series_hash: str, opened_by: str) -> str:
    """A group's idempotency key (no UID): the same group gets the same key after a restart."""
    text = "|".join((level, study_hash, series_hash, opened_by))
    return hashlib.sha256(text.encode("ascii", "replace")).hexdigest()[:24]


def _hash(uid: str) -> str:
    return uid_hash(uid) if uid else ""


def _marks(n: int) -> str:
    return ", ".join("?" * n)


class JobTable:
    """Thread-safe: DIMSE threads, HTTP threads and the worker share one; several processes
    (and replicas, on PostgreSQL) share the database. Every method is one transaction."""

    FILE = "jobs.sqlite3"

    def __init__(self, spool_root: Path, target: DbTarget | None = None) -> None:
        self.target = target if target is not None else DbTarget()
        self.path = spool_root / self.FILE  # the SQLite file (unused on PostgreSQL)
        self.db: Database = open_database(self.target, spool_root, self.FILE)
        try:
            migrate(self.db)
        except BaseException:
            self.db.close()
            raise

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def _run(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self.db.tx() as tx:
            return tx.execute(sql, tuple(params))[0]

    def close(self) -> None:
        self.db.close()

    # -- jobs -------------------------------------------------------------------------------

    def insert(self, name: str, study_uid: str, series_uid: str, sop_uid: str,
               protocol: str, calling_aet: str | None = None, owner: str | None = None) -> bool:
        """A newly spooled instance, state ``received``, held by ``owner`` (the worker that
        will process it). Idempotent on ``name``: False when the row existed already."""
        now = time.time()
        with self.db.tx() as tx:
            return tx.execute(
                "INSERT INTO jobs (name, study_hash, series_hash, sop_hash, protocol,"
                " state, attempts, received_at, updated_at, calling_aet, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (name, _hash(study_uid), _hash(series_uid), _hash(sop_uid), protocol,
                 RECEIVED, now, now, calling_aet, owner))[1] == 1

    def withdraw(self, name: str) -> bool:
        """Delete the row of an instance spooled but then refused (never acknowledged), while
        it is still ``received``: False when there was none to delete."""
        with self.db.tx() as tx:
            return tx.execute("DELETE FROM jobs WHERE name = ? AND state = ?",
                              (name, RECEIVED))[1] == 1

    def get(self, name: str) -> JobRow | None:
        rows = self._run(f"SELECT {_COLUMNS} FROM jobs WHERE name = ?", (name,))
        return JobRow(*rows[0]) if rows else None

    def rows(self, names: Collection[str]) -> dict[str, JobRow]:
        """The rows of these jobs (those that have one), by name."""
        out: dict[str, JobRow] = {}
        listed = list(names)
        for i in range(0, len(listed), _BATCH):
            chunk = listed[i:i + _BATCH]
            for r in self._run(f"SELECT {_COLUMNS} FROM jobs WHERE name IN"
                               f" ({_marks(len(chunk))})", chunk):
                out[r[0]] = JobRow(*r)
        return out

    def all(self) -> list[JobRow]:
        return [JobRow(*r) for r in self._run(f"SELECT {_COLUMNS} FROM jobs ORDER BY name")]

    def attempt(self, name: str, error: str | None = None) -> None:
        """Count one inference attempt (before the call); ``error`` notes why the previous one
        did not finish (e.g. ``triton_unavailable``)."""
        self._run("UPDATE jobs SET attempts = attempts + 1, updated_at = ?,"
                  " error = COALESCE(?, error) WHERE name = ?", (time.time(), error, name))

    def finish(self, name: str, state: str, error: str | None = None,
               owner: str | None = None) -> bool:
        """``received`` -> ``state`` (inferred, failed or skipped), once: False when the row
        was already final (or unknown), so a second transition is never made, or when
        ``owner`` (if given) no longer holds it (``finish_many``)."""
        return self.finish_many([name], state, error, owner) == 1

    def finish_many(self, names: Iterable[str], state: str, error: str | None = None,
                    owner: str | None = None) -> int:
        """``finish`` for several jobs in one transaction (a series inferred as one item);
        how many rows made the transition. With ``owner``, only rows that worker holds: those
        of a group it claims (``closing`` under it), or outside any group, its own (or no
        one's); a worker whose claim was taken over finishes nothing of it."""
        if state not in FINISHED:
            raise ValueError(f"not a final state: {state}")
        sql = ("UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE name = ? AND"
               " state = ?")
        held: tuple[Any, ...] = ()
        if owner is not None:
            sql += (" AND ((group_key IS NULL AND (owner IS NULL OR owner = ?)) OR group_key IN"
                    " (SELECT key FROM groups WHERE state = ? AND owner = ?))")
            held = (owner, CLOSING, owner)
        done = 0
        with self.db.tx() as tx:
            for name in names:
                done += tx.execute(sql, (state, error, time.time(), name, RECEIVED, *held))[1]
        return done

    def mark_delivered(self, names: Iterable[str]) -> None:
        """``inferred``/``failed`` -> ``delivered`` for these jobs, in one transaction: a
        destination confirmed their results. Idempotent; other states are left as they are."""
        now = time.time()
        with self.db.tx() as tx:
            for name in names:
                tx.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE name = ? AND"
                           " state IN (?, ?)", (DELIVERED, now, name, INFERRED, FAILED))

    # -- groups -----------------------------------------------------------------------------

    def open_group(self, key: str, level: str, study_hash: str, series_hash: str,
                   names: Iterable[str], due_at: float = 0.0) -> str:
        """``join_groups`` for one group's members; the key they joined."""
        keys = self.join_groups([(key, level, study_hash, series_hash, name)
                                 for name in names], {key: due_at})
        return next(iter(keys.values()), key)

    def join_groups(self, entries: Iterable[tuple[str, str, str, str, str]],
                    due: Mapping[str, float] | None = None) -> dict[str, str]:
        """Memberships for many arrivals in one transaction: (proposed key, level, study hash,
        series hash, job name) each. A job joins the open group of its (level, study, series)
        if any worker opened one, else opens it under the proposed key; the group's ``due_at``
        becomes at least ``due[proposed key]``. The key each job joined, by job name."""
        now, joined = time.time(), {}
        due = due or {}
        with self.db.tx() as tx:
            for key, level, study_hash, series_hash, name in entries:
                actual = self._open_key(tx, key, level, study_hash, series_hash, name, now)
                when = due.get(key, 0.0)
                tx.execute("UPDATE groups SET due_at = ?, updated_at = ? WHERE key = ? AND"
                           " due_at < ?", (when, now, actual, when))
                tx.execute("UPDATE jobs SET group_key = ? WHERE name = ?", (actual, name))
                joined[name] = actual
        return joined

    def _open_key(self, tx: Any, key: str, level: str, study_hash: str, series_hash: str,
                  name: str, now: float) -> str:
        """The open group's key for this (level, study, series), opening it when none is:
        under ``key``, or, when that key is taken by a group no longer open (claimed by
        another worker meanwhile), under a key named after the joining job ``name``."""
        select = ("SELECT key FROM groups WHERE level = ? AND study_hash = ? AND series_hash = ?"
                  " AND state = ?" + (" FOR UPDATE" if self.dialect != SQLITE else ""))
        ident = (level, study_hash, series_hash, OPEN)
        rows, _ = tx.execute(select, ident)
        if rows:
            return str(rows[0][0])
        for attempt in range(_REKEYS):
            tx.execute("INSERT INTO groups (key, level, study_hash, series_hash, state,"
                       " opened_at, updated_at, due_at) VALUES (?, ?, ?, ?, ?, ?, ?, 0)"
                       " ON CONFLICT DO NOTHING", (key, *ident[:3], OPEN, now, now))
            rows, _ = tx.execute(select, ident)  # ours, or the one a concurrent worker opened
            if rows:
                return str(rows[0][0])
            # the key names a group another worker claimed (or closed) while this worker
            # still held it open in memory: the arrival opens a new group under its own name
            key = group_key(level, study_hash, series_hash,
                            name if attempt == 0 else f"{name}|{attempt}")
        raise RuntimeError(f"no free key for a group opened by {name}")

    def claim_group(self, key: str, owner: str, now: float) -> tuple[str, float]:
        """Claim one group for closing: (CLAIMED, due) when it was open and due (now
        ``closing``, held by ``owner``) or already this owner's; (LATER, due_at) when open but
        a later arrival (maybe at another process) pushed its time; (GONE, 0) when another
        worker claimed or closed it."""
        with self.db.tx() as tx:
            rows, _ = tx.execute("SELECT state, due_at, owner FROM groups WHERE key = ?" + (
                " FOR UPDATE" if self.dialect != SQLITE else ""), (key,))
            if not rows:
                return GONE, 0.0
            state, due_at, holder = rows[0]
            if state == CLOSING and holder == owner:
                return CLAIMED, float(due_at)
            if state != OPEN:
                return GONE, 0.0
            if float(due_at) > now:
                return LATER, float(due_at)
            tx.execute("UPDATE groups SET state = ?, owner = ?, updated_at = ? WHERE key = ?"
                       " AND state = ?", (CLOSING, owner, time.time(), key, OPEN))
            return CLAIMED, float(due_at)

    def claim_due(self, owner: str, now: float, limit: int = 50) -> list[GroupRow]:
        """Claim open groups that are due, whoever opened them (a killed worker's included),
        in due order; those now ``closing`` under ``owner``."""
        with self.db.tx() as tx:
            keys = [k for (k,) in tx.execute(
                "SELECT key FROM groups WHERE state = ? AND due_at <= ? ORDER BY due_at, key"
                f" LIMIT {int(limit)}{self.db.skip_locked}", (OPEN, now))[0]]
            for key in keys:
                tx.execute("UPDATE groups SET state = ?, owner = ?, updated_at = ? WHERE"
                           " key = ? AND state = ?", (CLOSING, owner, time.time(), key, OPEN))
            if not keys:
                return []
            rows, _ = tx.execute(f"SELECT {_GROUP_COLUMNS} FROM groups WHERE key IN"
                                 f" ({_marks(len(keys))}) ORDER BY key", keys)
        return [GroupRow(*r) for r in rows]

    def close_group(self, key: str, owner: str | None = None) -> bool:
        """The group was handed on (or had nothing to hand on): closed for good. With
        ``owner``, only while that worker's claim holds (``closing`` under it): False when
        its claim was taken over, or nothing changed."""
        if owner is None:
            return self._close(key, "")
        return self._close(key, " AND state = ? AND owner = ?", CLOSING, owner)

    def _close(self, key: str, where: str, *params: Any) -> bool:
        with self.db.tx() as tx:
            return tx.execute("UPDATE groups SET state = ?, updated_at = ? WHERE key = ?"
                              + where, (CLOSED, time.time(), key, *params))[1] == 1

    def holds(self, key: str, owner: str) -> bool:
        """``owner`` still holds its claim on the group (``closing`` under it)."""
        return bool(self._run("SELECT 1 FROM groups WHERE key = ? AND state = ? AND owner = ?",
                              (key, CLOSING, owner)))

    def reopen(self, key: str, due_at: float) -> None:
        """A claimed group this worker could not finish (stopping): open again, due at
        ``due_at``, for whichever worker comes next."""
        self._run("UPDATE groups SET state = ?, owner = NULL, due_at = ?, updated_at = ?"
                  " WHERE key = ? AND state = ?", (OPEN, due_at, time.time(), key, CLOSING))

    def rearm(self, keys: Iterable[str], due_at: float) -> None:
        """Open groups due at ``due_at`` (their timers re-armed at a restart)."""
        with self.db.tx() as tx:
            for key in keys:
                tx.execute("UPDATE groups SET due_at = ? WHERE key = ? AND state = ?",
                           (due_at, key, OPEN))

    def group(self, key: str) -> GroupRow | None:
        rows = self._run(f"SELECT {_GROUP_COLUMNS} FROM groups WHERE key = ?", (key,))
        return GroupRow(*rows[0]) if rows else None

    def groups(self, state: str = OPEN) -> list[GroupRow]:
        return [GroupRow(*r) for r in self._run(
            f"SELECT {_GROUP_COLUMNS} FROM groups WHERE state = ? ORDER BY opened_at, key",
            (state,))]

    def members(self, key: str) -> list[JobRow]:
        return [JobRow(*r) for r in self._run(
            f"SELECT {_COLUMNS} FROM jobs WHERE group_key = ? ORDER BY name", (key,))]

    # -- workers, leases, take-over ---------------------------------------------------------

    def heartbeat(self, owner: str, lease_until: float) -> bool:
        """This worker is alive until ``lease_until`` (its claims are not taken before). False
        when its lease was gone (first beat, or taken over after a stall: its claims and rows
        may be another worker's now); the lease is registered again either way."""
        with self.db.tx() as tx:
            if tx.execute("UPDATE workers SET lease_until = ? WHERE owner = ?",
                          (lease_until, owner))[1]:
                return True
            tx.execute("INSERT INTO workers (owner, lease_until) VALUES (?, ?)"
                       " ON CONFLICT DO NOTHING", (owner, lease_until))
            return False

    def retire(self, owner: str) -> None:
        """A clean stop: the lease ends now, so live workers take over what is left."""
        self._run("DELETE FROM workers WHERE owner = ?", (owner,))

    def live_owners(self, now: float) -> set[str]:
        return {o for (o,) in self._run("SELECT owner FROM workers WHERE lease_until > ?",
                                        (now,))}

    def take_over(self, owner: str, now: float) -> list[JobRow]:
        """What workers whose lease ended (or rows with no owner) left: their ``closing``
        groups reopen, due now (a live worker claims them); their rows become ``owner``'s.
        The rows taken that belong to no open or closing group (the caller requeues or
        re-hands them); rows of a live worker are never taken."""
        dead = ("(owner IS NULL OR (owner != ? AND owner NOT IN (SELECT owner FROM workers"
                " WHERE lease_until > ?)))")
        with self.db.tx() as tx:
            tx.execute("DELETE FROM workers WHERE lease_until <= ? AND owner != ?", (now, owner))
            tx.execute(f"UPDATE groups SET state = ?, owner = NULL, due_at = ? WHERE state = ?"
                       f" AND {dead}", (OPEN, now, CLOSING, owner, now))
            names = [n for (n,) in tx.execute(
                f"SELECT name FROM jobs WHERE state = ? AND {dead} AND (group_key IS NULL OR"
                " group_key NOT IN (SELECT key FROM groups WHERE state IN (?, ?)))"
                f" ORDER BY name LIMIT {_BATCH}{self.db.skip_locked}",
                (RECEIVED, owner, now, OPEN, CLOSING))[0]]
            if not names:
                return []
            tx.execute(f"UPDATE jobs SET owner = ? WHERE name IN ({_marks(len(names))})",
                       (owner, *names))
            rows, _ = tx.execute(f"SELECT {_COLUMNS} FROM jobs WHERE name IN"
                                 f" ({_marks(len(names))}) ORDER BY name", names)
        return [JobRow(*r) for r in rows]

    def adopt(self, names: Iterable[str], owner: str, now: float) -> set[str]:
        """Of these rows, those without a live owner (nor ``owner`` itself) become
        ``owner``'s, each by one conditional UPDATE, so two workers never adopt one row; the
        names adopted."""
        adopted = set()
        with self.db.tx() as tx:
            for name in names:
                if tx.execute("UPDATE jobs SET owner = ? WHERE name = ? AND (owner IS NULL OR"
                              " (owner != ? AND owner NOT IN (SELECT owner FROM workers WHERE"
                              " lease_until > ?)))", (owner, name, owner, now))[1]:
                    adopted.add(name)
        return adopted

    # -- housekeeping and queries -----------------------------------------------------------

    def prune(self, retention_s: float, keep: Collection[str] = ()) -> int:
        """Delete rows in a final state not updated for ``retention_s`` seconds, except the
        jobs named in ``keep`` (their spool files still exist) and members of open or closing
        groups; then closed groups left without members. How many job rows went."""
        cutoff = time.time() - retention_s
        with self.db.tx() as tx:
            names = [n for (n,) in tx.execute(
                f"SELECT name FROM jobs WHERE state IN ({_marks(len(FINAL))}) AND"
                " updated_at < ? AND (group_key IS NULL OR group_key NOT IN"
                " (SELECT key FROM groups WHERE state IN (?, ?)))",
                (*FINAL, cutoff, OPEN, CLOSING))[0] if n not in keep]
            for name in names:
                tx.execute("DELETE FROM jobs WHERE name = ?", (name,))
            tx.execute("DELETE FROM groups WHERE state = ? AND updated_at < ? AND key NOT IN"
                       " (SELECT group_key FROM jobs WHERE group_key IS NOT NULL)",
                       (CLOSED, cutoff))
        if names:
            LOG.info("pruned %d finished jobs older than %.0f s", len(names), retention_s)
        return len(names)

    def pending(self, study_uid: str) -> int:
        """Instances of the study acknowledged and not finished yet."""
        (n,), = self._run("SELECT COUNT(*) FROM jobs WHERE study_hash = ? AND state = ?",
                          (uid_hash(study_uid), RECEIVED))
        return int(n)

    def count(self, state: str) -> int:
        (n,), = self._run("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,))
        return int(n)

    def received(self) -> list[JobRow]:
        return [JobRow(*r) for r in self._run(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY name", (RECEIVED,))]
