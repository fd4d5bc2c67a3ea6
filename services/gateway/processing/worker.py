"""The worker thread: spooled instances -> groups -> the runner -> the group sink (delivery
outbox), in arrival order.

This module is the thread and its queue only; each concern has its own module:

    recovery.py   what a stop left in the spool and the job table, as a plan applied here
    groups.py     open and closing groups and their timers (injected clock)
    runner.py     closing a group: selection, inference with retry, results, the hand-off

At level ``instance`` every instance is a group of its own, closed as soon as it is taken (the
behaviour before grouping existed). At level ``series`` or ``study`` an instance joins the open
group of its series (study), which closes when no instance of it was acknowledged for
``timeout_s`` (monotonic clock). Open groups live in the job table (``groups``,
``jobs.group_key``), so a restart reopens them and re-arms their timers from the restart.

While Triton is unavailable the current item is retried with capped exponential backoff; it is
never dropped, and the DIMSE edge keeps acknowledging only what reached the spool (up to
``max_depth``, then it refuses). No exception ends the worker thread.

The order of the durable steps makes a crash at any point recoverable without inferring a job
twice: result file (naming the job, or the group for a series result) -> rows finished (one
transaction, once) -> ``sink.accept`` (the sink records the group durably before returning;
a sink that raises is retried with backoff, never skipped) -> group closed -> spool files
removed. A group's memberships are recorded (one transaction per batch of arrivals) before it
can close. ``recover`` reconciles the spool with the table at start-up, before any new work.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from services.gateway.dicom.parsing import parse
from services.gateway.errors import GatewayError, InvalidInstance
from services.gateway.inference.core import InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.processing.grouping import GroupingPolicy, GroupSink
from services.gateway.processing.groups import (
    UIDS,
    Clock,
    Group,
    Groups,
    Job,
    Member,
    read_header,
)
from services.gateway.processing.recovery import RECOVERED, plan_recovery
from services.gateway.processing.runner import MAX_BACKOFF_S, Refused, Runner
from services.gateway.store.jobs import OPEN, JobRow, JobTable
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool

__all__ = ["Job", "SpoolWorker"]

LOG = logging.getLogger(__name__)
_PRUNE_EVERY_S = 3600.0


class SpoolWorker:
    def __init__(self, core: InferenceCore, spool: Spool, results: ResultStore,
                 metrics: GatewayMetrics, backoff_s: float, jobs: JobTable | None = None,
                 sink: GroupSink | None = None, policy: GroupingPolicy | None = None,
                 retention_s: float = 7 * 86400.0, clock: Clock = time.monotonic) -> None:
        """``jobs`` defaults to the job table beside the spool. ``sink`` receives every
        completed group (grouping.py) before its spool files are released; None: a closed
        group just finishes. ``policy`` defaults to the manifest's own; ``retention_s`` is how
        long finished rows stay in the job table; ``clock`` times groups and pruning."""
        self.jobs = jobs if jobs is not None else JobTable(spool.root)
        self.policy = policy if policy is not None else GroupingPolicy.resolve(core.manifest)
        self._retention = retention_s
        self._spool = spool
        self._results = results
        self._metrics = metrics
        self._backoff = backoff_s
        self._clock = clock
        self._queue: queue.Queue[tuple[Job, float] | None] = queue.Queue()
        self._depth = 0
        self._depth_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-worker", daemon=True)
        self.runner = Runner(core, spool, results, self.jobs, metrics, self.policy, sink,
                             backoff_s, self._stop)
        # worker-thread state (filled by ``start`` before the thread runs)
        self.groups = Groups(self.policy, clock)
        self._next_prune = 0.0

    @property
    def sink(self) -> GroupSink | None:
        return self.runner.sink

    @property
    def depth(self) -> int:
        """Acknowledged instances not yet finished (open groups included)."""
        return self._depth

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def open_groups(self) -> int:
        return self.groups.open_count

    def start(self) -> None:
        for job in self.recover():
            self.submit(job)
        self._prune()
        self._thread.start()

    # -- start-up ---------------------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Reconcile the spool with the job table after a stop, clean or not (recovery.py
        says what each leftover means); the jobs to run as new arrivals. Members of open
        groups rejoin their group (timer re-armed from now); finished instances whose group
        was not handed on yet are handed on again."""
        files = self._spool.pending()
        rows: dict[str, JobRow] = {}
        for path in files:
            row = self.jobs.get(path.name)
            if row is not None:
                rows[path.name] = row
        plan = plan_recovery(files, rows, self.jobs.received(), self.jobs.groups(OPEN),
                             self._results.stored, hand_on=self.sink is not None)
        for done in plan.finish:
            if done.lost:
                LOG.error("job %s was acknowledged but its spool file is gone", done.name)
            self.jobs.finish(done.name, done.state, done.reason)
        for new in plan.insert:
            self.jobs.insert(new.name, new.study_uid, new.series_uid, new.sop_uid, RECOVERED)
        for path in plan.remove:
            self._spool.remove(path)
        for key in plan.close:
            self.jobs.close_group(key)  # no member left on disk
        for rejoin in plan.rejoin:
            self.groups.rejoin(rejoin.member, rejoin.group)
            self._change_depth(+1)
        for rehand in plan.rehand:
            self.groups.rehand(rehand.member, rehand.row)
            self._change_depth(+1)
        self._metrics.groups_open.set(self.groups.open_count)
        if files:
            LOG.info("recovered %d acknowledged instances from the spool (%d open groups)",
                     len(files), plan.open_groups)
        return plan.requeue

    # -- queue ------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._change_depth(+1)
        self._queue.put((job, self._clock()))

    def _change_depth(self, delta: int) -> None:
        with self._depth_lock:
            self._depth += delta
            self._metrics.spool_depth.set(self._depth)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                items = [self._queue.get(timeout=self.groups.wait_s(self._next_prune))]
            except queue.Empty:
                items = []
            while True:  # take every arrival before closing groups: none is left behind
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None or self._stop.is_set():
                    break
                self._guarded(item[0], item[1])
            self._record_joins()
            if self._stop.is_set():
                return
            self._close_due()
            if self._clock() >= self._next_prune:
                self._prune()

    def _guarded(self, job: Job, acked: float) -> None:
        try:
            self._arrive(job, acked)
        except Exception as exc:  # a bug must not stop the queue behind this instance
            LOG.exception("unexpected %s on a spooled instance; quarantined",
                          type(exc).__name__)
            try:
                self.runner.give_up(job, None, GatewayError("internal error", "internal"))
            except Exception:  # e.g. the disk itself failing: keep serving the queue
                LOG.exception("could not quarantine spooled instance %s", job.path.name)
            self.groups.discard(job.path.name)
            self._change_depth(-1)

    def _prune(self) -> None:
        self._next_prune = self._clock() + _PRUNE_EVERY_S
        try:
            self.jobs.prune(self._retention, keep={p.name for p in self._spool.pending()})
        except Exception as exc:  # pruning is housekeeping: never stop the worker for it
            LOG.error("job table pruning failed: %s", type(exc).__name__)

    # -- arrivals ---------------------------------------------------------------------------

    def _arrive(self, job: Job, acked: float) -> None:
        name = job.path.name
        level = self.policy.level
        if self.groups.holds(name):  # submitted twice: the group it is in finishes it
            self._change_depth(-1)
            return
        if level == "instance":
            try:
                ds = parse(job.path.read_bytes())
            except GatewayError as exc:  # checked before the ack, so only a damaged file
                self.runner.give_up(job, None, exc)
                self._change_depth(-1)
                return
        else:
            header = read_header(job.path)
            if header is None:
                self.runner.give_up(job, None, InvalidInstance("unreadable DICOM file",
                                                               "unreadable"))
                self._change_depth(-1)
                return
            ds = header
        member = Member(job, ds, full=level == "instance")
        study, series, sop = (member.uid(k) for k in UIDS)
        self.jobs.insert(name, study, series, sop, job.protocol,  # no-op when acked here
                         job.calling_aet)
        ready = self.groups.add(member, acked)
        self._metrics.groups_open.set(self.groups.open_count)
        if ready is not None:
            self._close(ready)

    def _record_joins(self) -> None:
        """New memberships, one transaction per batch of arrivals (before any member can be
        finished). Not yet recorded at a crash: the rows are still ``received`` without a
        group, so a restart groups them again; nothing is lost or inferred twice."""
        if not self.groups.joins:
            return
        try:
            self.jobs.join_groups(self.groups.joins)
        except Exception as exc:  # retried with the next batch; closing waits for it
            LOG.error("recording group memberships failed: %s", type(exc).__name__)
            self._stop.wait(self._backoff)
            return
        self.groups.joins_recorded()

    def _close_due(self) -> None:
        for group in self.groups.due():  # none while a membership is unrecorded
            self._metrics.groups_open.set(self.groups.open_count)
            self._close(group)
            if self._stop.is_set():
                break

    def _close(self, group: Group) -> None:
        """The runner closes the group; unfinished (stopping, or a sink that raised), it is
        kept and tried again when due."""
        outcome = self.runner.close(group)
        if outcome == "stopping":
            self.groups.keep(group)  # ``recover`` takes it up again after a restart
        elif isinstance(outcome, Refused):
            delay = self.groups.defer(group, self._backoff, MAX_BACKOFF_S)
            LOG.warning("group %s: sink refused (%s); retrying in %.2fs", group.key,
                        outcome.error, delay)
        else:
            self._change_depth(-len(group.members))
            self.groups.release(group)
