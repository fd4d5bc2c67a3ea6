"""Durable spool of acknowledged instances (the result store is ``results.py``).

An instance is acknowledged (C-STORE success) only after ``Spool.put`` returned: the bytes are
written to a temporary name, fsynced, renamed into ``incoming/`` and the directory fsynced.
A spooled file leaves ``incoming/`` only after its result (or error result) is stored, so a
restart re-processes whatever was acknowledged but not finished. A file that cannot be
processed at all is moved to ``failed/``, never deleted.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

from services.gateway.store.durable import fsync_dir, remove_stale_temporaries


class DirSync:
    """Group commit of one directory's fsync across threads.

    Concurrent associations each rename a file into ``incoming/`` and each must see the new
    entry durable before acknowledging; one directory fsync made after several renames makes
    all of them durable. ``sync`` takes a ticket after the caller's change and returns once an
    fsync that *started after the ticket was taken* has completed: it makes its own or rides
    on one that began later than its change. With one caller at a time it is a plain fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._counters = threading.Lock()
        self._syncing = threading.Lock()  # one fsync of this directory at a time
        self._requested = 0  # tickets handed out
        self._durable = 0  # every ticket <= this is covered by a completed fsync
        self.fsyncs = 0  # fsyncs made (tests read it)

    def sync(self) -> None:
        with self._counters:
            self._requested += 1
            ticket = self._requested
        with self._syncing:
            with self._counters:
                if self._durable >= ticket:  # an fsync begun after our change has completed
                    return
                covers = self._requested  # every change made before this read is covered
            fsync_dir(self.path)  # OSError: nothing marked durable; the caller refuses
            with self._counters:
                self._durable = max(self._durable, covers)
                self.fsyncs += 1


def durable_mkdir(path: Path) -> None:
    """Create ``path`` and make its directory entry durable (fsync the parent)."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    fsync_dir(path.parent)


def write_durably(path: Path, data: bytes | bytearray | memoryview,
                   dir_sync: DirSync | None = None) -> None:
    """``data`` under ``path``, atomically and durably: written to a temporary name with plain
    ``os.write`` calls (no buffered copy), fsynced, renamed, and the directory fsynced
    (through ``dir_sync``, shared by concurrent writers, when given).

    The temporary name is this write's own (``O_EXCL``, a random part), so any number of
    writers of the same ``path`` may run at once: each renames a complete file of its own over
    ``path``, readers see one whole file or another, and the last rename stays. A write that
    fails before its rename removes its temporary file."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if dir_sync is not None:
        dir_sync.sync()
    else:
        fsync_dir(path.parent)


class Spool:
    def __init__(self, root: Path) -> None:
        durable_mkdir(root)
        self.root = root
        self.incoming = root / "incoming"
        self.failed = root / "failed"
        durable_mkdir(self.incoming)
        durable_mkdir(self.failed)
        self._incoming_sync = DirSync(self.incoming)  # shared by every association's put
        # never acknowledged: safe to drop, once old enough not to be another process's write
        remove_stale_temporaries(self.incoming.glob("*.tmp"))

    def put(self, data: bytes | bytearray | memoryview) -> Path:
        """Durable before it returns (file and directory entry fsynced); concurrent callers
        share directory fsyncs (``DirSync``)."""
        path = self.incoming / f"{time.time_ns():020d}-{uuid.uuid4().hex}.dcm"
        write_durably(path, data, self._incoming_sync)
        return path

    def pending(self) -> list[Path]:
        return sorted(self.incoming.glob("*.dcm"))

    @staticmethod
    def remove(path: Path) -> None:
        """Drop a spool file whose job is final (or that was never acknowledged). Not fsynced,
        on purpose: a removal lost to a power cut brings back a file whose job row is already
        final, and start-up reconciliation removes it (or hands its stored result on again,
        which the outbox takes once); an unacknowledged file without a row is processed once.
        So the worker spends no journal commit here, and the acknowledgement path's fsyncs do
        not queue behind it."""
        path.unlink(missing_ok=True)

    def quarantine(self, path: Path) -> Path:
        """Keep an acknowledged file that cannot be processed, for a person to look at."""
        target = self.failed / path.name
        os.replace(path, target)
        fsync_dir(self.failed)
        fsync_dir(path.parent)
        return target
