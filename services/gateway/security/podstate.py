"""Limits counted per pod, not per process: the token buckets of the rate limit, the
association counts of the DIMSE edge and the HTTP connections per source address, shared by
every gateway process of one pod.

The state is a small SQLite file in the pod's run directory, which the supervisor creates
for the pod and removes after it; never in the spool, which replicas may share while each pod
keeps its own limits. Each change is one ``BEGIN IMMEDIATE`` transaction, so the processes of
the pod take turns on it (SQLite's file locks). Nothing here must survive the pod: the
journal is WAL without fsync (``synchronous=OFF``): a process killed mid-transaction loses
nothing committed, and a power loss loses a pod whose limits start over anyway.

Holds (an association counted against its calling AE title, or against the pod's total; an
HTTP connection against its source address, ``connections.SourceCounts``) are recorded per
process, so that a process that dies, killed with SIGKILL included, gives back what it held:
the supervisor calls ``PodState.release_process`` for its index before restarting it, and the
process itself clears its index at start. Holds keyed by a calling AE title are bounded by
the number of associations the pod accepts, those keyed by a source address by the
connections the pod holds open (a row goes when its count is 0); buckets of principals not
seen for ``IDLE_DROP_S`` are dropped. The file holds AE titles, source addresses and principal
names (API key names, certificate subjects), never patient data.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

IDLE_DROP_S = 600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    who    TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    stamp  REAL NOT NULL     -- CLOCK_MONOTONIC, shared by every process of the host
);
CREATE TABLE IF NOT EXISTS holds (
    key     TEXT NOT NULL,
    process INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    PRIMARY KEY (key, process)
);
"""


def refill(tokens: float, stamp: float, now: float, rate_per_s: float,
           burst: float) -> tuple[float, float]:
    """Take one token from a bucket holding ``tokens`` at ``stamp``: (tokens left, 0.0) when
    allowed, else (tokens, seconds until a token is due). The one token-bucket rule, used by
    the in-process and the pod-wide limiter alike."""
    tokens = min(burst, tokens + max(0.0, now - stamp) * rate_per_s)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate_per_s


class PodState:
    FILE = "limits.sqlite3"

    def __init__(self, run_dir: Path, process: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``process``: this process's index in the pod (its holds are kept under it)."""
        self.path = run_dir / self.FILE
        self.process = process
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(_SCHEMA)
        self.release_all()

    def take(self, who: str, rate_per_s: float, burst: float) -> float:
        """A token from ``who``'s pod-wide bucket: 0.0 when allowed, else seconds to wait."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT tokens, stamp FROM buckets WHERE who = ?",
                                       (who,)).fetchone()
                if row is None:
                    self._db.execute("DELETE FROM buckets WHERE stamp < ?", (now - IDLE_DROP_S,))
                tokens, stamp = (float(row[0]), float(row[1])) if row is not None \
                    else (burst, now)
                tokens, wait = refill(tokens, stamp, now, rate_per_s, burst)
                self._db.execute("INSERT OR REPLACE INTO buckets (who, tokens, stamp)"
                                 " VALUES (?, ?, ?)", (who, tokens, now))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return wait

    def hold(self, key: str, limit: int) -> int | None:
        """Count one more hold of ``key`` for this process if the pod holds fewer than
        ``limit``: None when counted, else how many the pod holds."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (held,) = self._db.execute("SELECT COALESCE(SUM(n), 0) FROM holds WHERE key = ?",
                                           (key,)).fetchone()
                if held < limit:
                    self._db.execute(
                        "INSERT INTO holds (key, process, n) VALUES (?, ?, 1) ON CONFLICT"
                        " (key, process) DO UPDATE SET n = n + 1", (key, self.process))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return None if held < limit else int(held)

    def release(self, key: str) -> None:
        """Give back one hold of ``key`` taken by this process."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE holds SET n = n - 1 WHERE key = ? AND process = ?",
                             (key, self.process))
            self._db.execute("DELETE FROM holds WHERE n <= 0")
            self._db.execute("COMMIT")

    def held(self, key: str) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COALESCE(SUM(n), 0) FROM holds WHERE key = ?",
                                    (key,)).fetchone()
        return int(n)

    def release_all(self) -> None:
        """Give back everything this process index held (at start: a previous process of the
        same index may have died holding some)."""
        with self._lock:
            self._db.execute("DELETE FROM holds WHERE process = ?", (self.process,))

    @classmethod
    def release_process(cls, run_dir: Path, process: int) -> None:
        """What the dead process ``process`` held, given back (run by the supervisor)."""
        if not (run_dir / cls.FILE).exists():
            return
        db = sqlite3.connect(run_dir / cls.FILE, isolation_level=None, timeout=30.0)
        try:
            db.execute("DELETE FROM holds WHERE process = ?", (process,))
        finally:
            db.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()
