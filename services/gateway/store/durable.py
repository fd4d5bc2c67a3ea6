"""Durable-storage primitives shared by the spool, the job table and the outbox: a directory
fsync, and a SQLite database in WAL mode with ``synchronous=FULL`` whose writes are explicit
``BEGIN IMMEDIATE`` transactions under one lock."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A temporary file this old was left by a write a crash stopped: a live writer (another gateway
# process sharing the spool) renames its own within milliseconds.
STALE_TMP_S = 600.0


def remove_stale_temporaries(paths: Iterable[Path], min_age_s: float = STALE_TMP_S) -> None:
    """Remove the temporary files among ``paths`` not modified for ``min_age_s``: at start, only
    writes a crash stopped, never those of other processes writing the same spool now."""
    cutoff = time.time() - min_age_s
    for path in paths:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
        except FileNotFoundError:  # renamed or removed meanwhile
            continue


# SQLite's journal for a database several hosts open (the outbox and the reverse UID map on
# the ReadWriteMany spool that gateway replicas share): WAL keeps its index in shared memory,
# which exists only within one host, so across hosts SQLite needs its rollback journal and the
# network filesystem's POSIX locks. WAL (the default) for a spool only one pod uses.
WAL, SHARED_VOLUME = "wal", "delete"


def open_journal(db: sqlite3.Connection, journal: str, what: str, path: Path) -> None:
    """``journal`` (WAL or SHARED_VOLUME) with ``synchronous=FULL``, or OSError."""
    mode = db.execute(f"PRAGMA journal_mode={journal.upper()}").fetchone()[0]
    if str(mode).lower() != journal:
        raise OSError(f"{what} {path}: journal mode {journal} refused ({mode})")
    db.execute("PRAGMA synchronous=FULL")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a claim or lease holder found dead on
    the same host is released at once instead of after its timeout)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class DurableDb:
    """One connection shared by threads. In WAL mode a process crash loses no commit; FULL also
    fsyncs the WAL (or the rollback journal and the database, ``SHARED_VOLUME``) at every
    commit, so a committed row survives a power loss as surely as an fsynced file does."""

    def __init__(self, path: Path, what: str, journal: str = WAL) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        open_journal(self._db, journal, what, path)

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
