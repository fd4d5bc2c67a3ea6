"""A supervisor of N identical worker processes: start them, restart one that dies, stop them
all on SIGTERM or Ctrl-C, and never leave one behind.

Each worker is a fresh interpreter (``multiprocessing``'s spawn: no state, lock or thread is
inherited from the supervisor) running ``target(index)``; the first thing it does is
``die_with_parent``, so a supervisor killed with SIGKILL takes its workers with it (they get
SIGTERM and drain). A worker that dies is restarted under the same index after a back-off that
doubles while it keeps dying young; one that exits with ``FATAL`` (a configuration error it
raised at start) stops the whole group, since a restart would fail the same way. On SIGTERM
or SIGINT the supervisor sends SIGTERM to every worker, waits up to ``grace_s`` for them to
drain, then kills what is left.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from services.lifetime import die_with_parent

LOG = logging.getLogger(__name__)
FATAL = 2  # a worker's exit code for "do not restart me": the group stops with it
_YOUNG_S = 10.0  # a worker that dies sooner than this is restarted after a longer back-off


def _worker_main(target: Callable[[int], None], index: int, name: str, parent_pid: int) -> None:
    die_with_parent(signal.SIGTERM, parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which decides
    multiprocessing.current_process().name = f"{name}-{index}"
    target(index)


@dataclass
class _Slot:
    index: int
    process: Any  # multiprocessing's SpawnProcess
    started: float
    backoff_s: float
    restart_at: float | None = None  # set while waiting to restart


class Supervisor:
    def __init__(self, target: Callable[[int], None], count: int, name: str = "worker",
                 on_exit: Callable[[int, int], None] | None = None, grace_s: float = 50.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        """``target``: a picklable callable (a module-level function, or a partial of one
        with picklable arguments) run as ``target(index)`` in each worker. ``on_exit(index,
        pid)`` runs in the supervisor after a worker ended, before it is restarted (release
        what the dead process held)."""
        if count < 1:
            raise ValueError("count must be >= 1")
        self._target = target
        self._count = count
        self._name = name
        self._on_exit = on_exit
        self._grace_s = grace_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._ctx = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []
        self._stopping = False
        self.restarts = 0

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process.pid is not None]

    def _spawn(self, index: int) -> Any:
        process = self._ctx.Process(target=_worker_main, name=f"{self._name}-{index}",
                                    args=(self._target, index, self._name, os.getpid()))
        process.start()
        LOG.info("%s-%d started (pid %d)", self._name, index, process.pid)
        return process

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def run(self) -> int:
        """Until SIGTERM/SIGINT (0) or a worker's fatal exit (``FATAL``). Call from the main
        thread: the workers' parent-death signal follows the thread that started them."""
        previous = {sig: signal.signal(sig, self._request_stop)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        code = 0
        try:
            now = time.monotonic()
            self._slots = [_Slot(i, self._spawn(i), now, self._backoff_s)
                           for i in range(self._count)]
            code = self._watch()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _watch(self) -> int:
        while not self._stopping:
            live = {s.process.sentinel: s for s in self._slots if s.restart_at is None}
            multiprocessing.connection.wait(list(live), timeout=0.2)
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is None and not slot.process.is_alive():
                    if self._ended(slot, now) == FATAL:
                        return FATAL
                elif slot.restart_at is not None and now >= slot.restart_at \
                        and not self._stopping:
                    slot.process, slot.started, slot.restart_at = (
                        self._spawn(slot.index), now, None)
                    self.restarts += 1
        return 0

    def _ended(self, slot: _Slot, now: float) -> int:
        process = slot.process
        process.join(timeout=1)
        code = process.exitcode
        if self._on_exit is not None and process.pid is not None:
            try:
                self._on_exit(slot.index, process.pid)
            except Exception:  # housekeeping must not stop the supervisor
                LOG.exception("clean-up after %s-%d failed", self._name, slot.index)
        if self._stopping:
            return 0
        if code == FATAL:
            LOG.error("%s-%d (pid %d) failed to start; stopping", self._name, slot.index,
                      process.pid)
            return FATAL
        young = now - slot.started < _YOUNG_S
        slot.backoff_s = min(slot.backoff_s * 2, self._max_backoff_s) if young \
            else self._backoff_s
        delay = slot.backoff_s if young else 0.0
        LOG.error("%s-%d (pid %d) ended with %s; restarting in %.1f s", self._name, slot.index,
                  process.pid, code, delay)
        slot.restart_at = now + delay
        return 0

    def _stop_all(self) -> None:
        running = [s for s in self._slots if s.restart_at is None and s.process.is_alive()]
        for slot in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._grace_s
        for slot in running:
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                LOG.warning("%s-%d did not stop in %.0f s; killing it", self._name, slot.index,
                            self._grace_s)
                slot.process.kill()
                slot.process.join(timeout=5)
        for slot in self._slots:
            if slot.restart_at is None and slot.process.pid is not None \
                    and self._on_exit is not None:
                try:
                    self._on_exit(slot.index, slot.process.pid)
                except Exception:
                    LOG.exception("clean-up after %s-%d failed", self._name, slot.index)
        LOG.info("%d %s processes stopped", len(self._slots), self._name)
