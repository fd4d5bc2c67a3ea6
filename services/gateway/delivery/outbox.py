"""The delivery outbox: one durable row per (group key, destination), and its states.

Durability: the outbox is SQLite in WAL mode with ``synchronous=FULL``, in its own file beside
the spool (``outbox.sqlite3``), files under ``outbox/``. It holds the group key (hashed, no
UID), destination and route names, file names, job names and reasons; no patient data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.gateway.store.durable import WAL, DurableDb, pid_alive

LOG = logging.getLogger(__name__)
PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
RETRY = "retry"  # an attempt's outcome when the row stays pending
STATES = (PENDING, DELIVERED, DEAD)
MarkDelivered = Callable[[Sequence[str]], None]
# Several gateway processes may share one outbox: a row one of them is sending is not due for
# the others for this long (its sender dying leaves it due again after it).
CLAIM_S = 300.0
ORPHAN_AGE_S = 600.0  # a rowless folder younger than this may be another process's accept

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    group_key   TEXT NOT NULL,          -- hashed idempotency key of the group, no UID
    destination TEXT NOT NULL,
    route       TEXT NOT NULL,
    protocol    TEXT NOT NULL,
    folder      TEXT NOT NULL,          -- under outbox/, '' when nothing could be built
    files       TEXT NOT NULL,          -- JSON list of file names in folder
    stored      TEXT NOT NULL DEFAULT '[]',  -- files the destination confirmed
    job_names   TEXT NOT NULL,          -- JSON list of job-table names
    state       TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    next_at     REAL NOT NULL,
    updated_at  REAL NOT NULL,
    reason      TEXT,
    message     TEXT,
    marked      INTEGER NOT NULL DEFAULT 0,  -- jobs marked delivered in the job table
    UNIQUE (group_key, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (destination, state, next_at);
"""
_COLUMNS = ("id, group_key, destination, route, protocol, folder, files, stored, job_names, "
            "state, attempts, created_at, next_at, updated_at, reason, message")


@dataclass(frozen=True)
class OutboxRow:
    id: int
    group_key: str
    destination: str
    route: str
    protocol: str
    folder: str
    files: tuple[str, ...]
    stored: tuple[str, ...]
    job_names: tuple[str, ...]
    state: str
    attempts: int
    created_at: float
    next_at: float
    updated_at: float
    reason: str | None
    message: str | None

    @classmethod
    def of(cls, row: Sequence[Any]) -> OutboxRow:
        values = list(row)
        for k in (6, 7, 8):
            values[k] = tuple(json.loads(values[k]))
        return cls(*values)


@dataclass(frozen=True)
class NewRow:
    destination: str
    files: tuple[Path, ...]  # written and fsynced, all in one folder under outbox/


class Outbox(DurableDb):
    """Thread-safe (one connection, one lock); every method is one transaction."""

    FILE = "outbox.sqlite3"
    FOLDER = "outbox"

    def __init__(self, spool_root: Path, clock: Callable[[], float] = time.time,
                 journal: str = WAL) -> None:
        """``journal``: SHARED_VOLUME when replicas on several hosts share the spool."""
        self.folder = spool_root / self.FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        super().__init__(spool_root / self.FILE, "outbox", journal)
        self._db.executescript(_SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)").fetchall()}
        if "claimed_by" not in cols:  # the claim's holder (host-pid), added for shared outboxes
            with self._tx() as db:
                db.execute("ALTER TABLE outbox ADD COLUMN claimed_by TEXT")
        self._release_dead_claims()
        self._remove_orphans()

    def _release_dead_claims(self) -> None:
        """Rows a process of this host claimed and could not finish (killed mid-send) are due
        again now, not when the claim would have run out."""
        host = socket.gethostname()
        with self._tx() as db:
            for row_id, holder in db.execute(
                    "SELECT id, claimed_by FROM outbox WHERE state = ? AND claimed_by IS NOT"
                    " NULL", (PENDING,)).fetchall():
                at, _, pid = str(holder).rpartition("-")
                if at == host and pid.isdigit() and not pid_alive(int(pid)):
                    db.execute("UPDATE outbox SET next_at = ?, claimed_by = NULL WHERE id = ?",
                               (self._clock(), row_id))

    def _remove_orphans(self) -> None:
        """Folders written by an ``accept`` that crashed before its rows were committed: that
        group was not accepted, so the worker offers it again and they are rebuilt (over any
        leftover). Only old ones: a young folder may be another process's accept in progress."""
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT folder FROM outbox")}
        now = time.time()
        for entry in self.folder.iterdir():
            if entry.name not in known and now - entry.stat().st_mtime > ORPHAN_AGE_S:
                shutil.rmtree(entry, ignore_errors=True)

    def folder_for(self, group_key: str, destination: str) -> Path:
        digest = hashlib.sha256(f"{group_key}|{destination}".encode()).hexdigest()[:24]
        return self.folder / digest

    def destinations_of(self, group_key: str) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute(
                "SELECT destination FROM outbox WHERE group_key = ?", (group_key,))}

    def add(self, group_key: str, route: str, protocol: str, job_names: Sequence[str],
            rows: Sequence[NewRow], dead_reason: tuple[str, str] | None = None) -> None:
        """Rows of one group, in one transaction; idempotent on (group key, destination).
        ``dead_reason`` (reason, message) records them straight as dead-letter."""
        now = self._clock()
        state = PENDING if dead_reason is None else DEAD
        reason, message = dead_reason or (None, None)
        with self._tx() as db:
            for row in rows:
                folder = row.files[0].parent.name if row.files else ""
                db.execute(
                    "INSERT OR IGNORE INTO outbox (group_key, destination, route, protocol,"
                    " folder, files, job_names, state, created_at, next_at, updated_at, reason,"
                    " message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (group_key, row.destination, route, protocol, folder,
                     json.dumps([f.name for f in row.files]), json.dumps(list(job_names)),
                     state, now, now, now, reason, message))

    def get(self, row_id: int) -> OutboxRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?",
                                   (row_id,)).fetchone()
        return OutboxRow.of(row) if row is not None else None

    def rows(self, group_key: str | None = None) -> list[OutboxRow]:
        with self._lock:
            if group_key is None:
                found = self._db.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id")
            else:
                found = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE group_key = ?"
                                         " ORDER BY id", (group_key,))
            return [OutboxRow.of(r) for r in found.fetchall()]

    def due(self, destination: str, now: float) -> OutboxRow | None:
        """The pending row of ``destination`` due first, if it is due by ``now``."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE destination = ? AND state = ? AND"
                " next_at <= ? ORDER BY next_at, id LIMIT 1",
                (destination, PENDING, now)).fetchone()
        return OutboxRow.of(row) if row is not None else None

    def claim(self, destination: str, now: float, hold_s: float = CLAIM_S) -> OutboxRow | None:
        """``due``, taken for sending: in the same transaction its ``next_at`` moves ``hold_s``
        ahead, so no other process sharing the outbox sends it meanwhile; ``retry``,
        ``delivered`` or ``dead`` then set what follows."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE destination = ? AND state = ? AND"
                " next_at <= ? ORDER BY next_at, id LIMIT 1",
                (destination, PENDING, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE outbox SET next_at = ?, claimed_by = ? WHERE id = ?",
                       (now + hold_s, _claimant(), row[0]))
        return OutboxRow.of(row)

    def release(self, row_id: int, next_at: float) -> None:
        """A claimed row that was not attempted after all: due at ``next_at``."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET next_at = ?, claimed_by = NULL WHERE id = ? AND"
                       " state = ?", (next_at, row_id, PENDING))

    def next_at(self, destination: str) -> float | None:
        with self._lock:
            (when,) = self._db.execute(
                "SELECT MIN(next_at) FROM outbox WHERE destination = ? AND state = ?",
                (destination, PENDING)).fetchone()
        return None if when is None else float(when)

    def mark_stored(self, row_id: int, name: str) -> None:
        with self._tx() as db:
            (stored,) = db.execute("SELECT stored FROM outbox WHERE id = ?",
                                   (row_id,)).fetchone()
            names = json.loads(stored)
            if name not in names:
                db.execute("UPDATE outbox SET stored = ?, updated_at = ? WHERE id = ?",
                           (json.dumps([*names, name]), self._clock(), row_id))

    def retry(self, row_id: int, attempts: int, next_at: float, reason: str,
              message: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts = ?, next_at = ?, updated_at = ?,"
                       " reason = ?, message = ? WHERE id = ? AND state = ?",
                       (attempts, next_at, self._clock(), reason, message, row_id, PENDING))

    def dead(self, row_id: int, attempts: int, reason: str, message: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET state = ?, attempts = ?, updated_at = ?, reason = ?,"
                       " message = ? WHERE id = ? AND state = ?",
                       (DEAD, attempts, self._clock(), reason, message, row_id, PENDING))

    def delivered(self, row_id: int, attempts: int) -> bool:
        """The row is delivered; True when that made its whole group delivered."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET state = ?, attempts = ?, updated_at = ?,"
                       " next_at = ? WHERE id = ? AND state = ?",
                       (DELIVERED, attempts, self._clock(), self._clock(), row_id, PENDING))
            (key,) = db.execute("SELECT group_key FROM outbox WHERE id = ?",
                                (row_id,)).fetchone()
            (left,) = db.execute("SELECT COUNT(*) FROM outbox WHERE group_key = ? AND"
                                 " state != ?", (key, DELIVERED)).fetchone()
        return int(left) == 0

    def unmarked_groups(self) -> list[tuple[str, tuple[str, ...]]]:
        """Fully delivered groups whose jobs are not yet marked delivered (group key, jobs)."""
        with self._lock:
            found = self._db.execute(
                "SELECT group_key, MIN(job_names) FROM outbox GROUP BY group_key HAVING"
                " SUM(state != ?) = 0 AND MIN(marked) = 0", (DELIVERED,)).fetchall()
        return [(str(k), tuple(json.loads(j))) for k, j in found]

    def set_marked(self, group_key: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET marked = 1 WHERE group_key = ?", (group_key,))

    def requeue(self, destination: str | None = None, ids: Sequence[int] = ()) -> int:
        """Dead-letter rows back to ``pending`` (an operator fixed the destination): attempts
        and age start again. Rows with no files (results that could not be built) stay dead.
        Either a destination or row ids; returns how many rows were requeued. A running
        gateway's sender picks them up at its next poll."""
        if (destination is None) == (not ids):
            raise ValueError("requeue: a destination or row ids, not both")
        now = self._clock()
        where, args = (("destination = ?", [destination]) if destination is not None else
                       (f"id IN ({', '.join('?' * len(ids))})", list(ids)))
        with self._tx() as db:
            cur = db.execute(
                "UPDATE outbox SET state = ?, attempts = 0, created_at = ?, next_at = ?,"
                f" updated_at = ?, message = 'requeued' WHERE state = ? AND folder != '' AND"
                f" {where}", [PENDING, now, now, now, DEAD, *args])
            return int(cur.rowcount)

    def count(self, state: str, destination: str | None = None) -> int:
        with self._lock:
            if destination is None:
                (n,) = self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = ?",
                                        (state,)).fetchone()
            else:
                (n,) = self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = ? AND"
                                        " destination = ?", (state, destination)).fetchone()
        return int(n)


def _claimant() -> str:
    """This process as a claim's holder: host and pid (after a fork, the child's), no
    patient data."""
    return f"{socket.gethostname()}-{os.getpid()}"


