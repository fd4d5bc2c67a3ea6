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

Several workers share one spool and one job table (gateway processes in a pod, replicas on
PostgreSQL with the spool on a shared volume): each has an ``owner`` id and a lease it renews
from a thread of its own (``lease_s``). Groups are keyed in the table; a local timer says when
to try to claim a group, the table's conditional UPDATE says who closes it, and the claimer
reads the members other workers spooled from the shared spool. Every ``lease_s / 3`` the worker
claims due groups whoever opened them and takes over the rows and ``closing`` groups of workers
whose lease ran out (killed); start-up recovery looks only at what no live worker holds. A
worker that stalled past its lease hears it from its next heartbeat and drops what it no longer
holds; its runner finishes and closes only under its claim, so a group is handed on once.
Times in the table (due times, leases) come from ``clock``: wall time by default, the one clock
replicas share.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from pathlib import Path

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
from services.gateway.processing.recovery import RECOVERED, RecoveryPlan, plan_recovery
from services.gateway.processing.runner import MAX_BACKOFF_S, Refused, Runner
from services.gateway.store.durable import pid_alive
from services.gateway.store.jobdb import JobDbUnavailable
from services.gateway.store.jobs import (
    CLAIMED,
    CLOSING,
    LATER,
    OPEN,
    RECEIVED,
    GroupRow,
    JobRow,
    JobTable,
)
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool

__all__ = ["Job", "SpoolWorker"]

LOG = logging.getLogger(__name__)
_PRUNE_EVERY_S = 3600.0


class SpoolWorker:
    def __init__(self, core: InferenceCore, spool: Spool, results: ResultStore,
                 metrics: GatewayMetrics, backoff_s: float, jobs: JobTable | None = None,
                 sink: GroupSink | None = None, policy: GroupingPolicy | None = None,
                 retention_s: float = 7 * 86400.0, clock: Clock = time.time,
                 owner: str | None = None, lease_s: float = 15.0) -> None:
        """``jobs`` defaults to the job table beside the spool. ``sink`` receives every
        completed group (grouping.py) before its spool files are released; None: a closed
        group just finishes. ``policy`` defaults to the manifest's own; ``retention_s`` is how
        long finished rows stay in the job table; ``clock`` times groups, leases and pruning
        (shared with the other workers through the table). ``owner`` names this worker in the
        table (default: host, pid and a random part; no patient data); ``lease_s``: how long
        after its last heartbeat a silent worker's claims are taken over."""
        self.jobs = jobs if jobs is not None else JobTable(spool.root)
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s
        self._scan_every = lease_s / 3
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
        self._beat = threading.Thread(target=self._heartbeats, name="worker-lease", daemon=True)
        self._lease_lost = threading.Event()  # set by the lease thread, read by the worker
        self.runner = Runner(core, spool, results, self.jobs, metrics, self.policy, sink,
                             backoff_s, self._stop, owner=self.owner)
        # worker-thread state (filled by ``start`` before the thread runs)
        self.groups = Groups(self.policy, clock)
        self._next_prune = 0.0
        self._next_scan = 0.0
        self._next_reconcile = 0.0

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
        self.jobs.heartbeat(self.owner, self._clock() + self.lease_s)
        for job in self.recover():
            self.submit(job)
        self._prune()
        self._next_scan = self._clock() + self._scan_every
        self._next_reconcile = self._clock() + 2 * self.lease_s
        self._beat.start()
        self._thread.start()

    def _heartbeats(self) -> None:
        """Renew this worker's lease until it stops; a failed renewal is retried (the lease
        outlives a few of them). A lease found gone (a stall longer than the lease: another
        worker took over this one's rows and claims) is reported to the worker thread."""
        while not self._stop.wait(self._scan_every):
            try:
                if not self.jobs.heartbeat(self.owner, self._clock() + self.lease_s):
                    LOG.warning("this worker's lease had expired; what it held may have been"
                                " taken over")
                    self._lease_lost.set()
            except Exception as exc:
                LOG.error("job table lease renewal failed: %s", type(exc).__name__)

    # -- start-up ---------------------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Reconcile the spool with the job table after a stop, clean or not (recovery.py
        says what each leftover means); the jobs to run as new arrivals. Only what no live
        worker holds: rows of workers whose lease ended (or of none), and spool files without
        a row when no other worker is alive (one may be between its spool write and its row)
        or older than a lease. Members of open groups rejoin their group (timer re-armed from
        now); finished instances whose group was not handed on yet are handed on again."""
        now = self._clock()
        self._retire_dead_neighbours(now)
        self.jobs.take_over(self.owner, now)  # dead workers' closing groups reopen
        return self._reconcile(startup=True)

    def _reconcile(self, startup: bool) -> list[Job]:
        """``recover``'s plan for what no live worker holds, at start-up or (``startup``
        False) while running, for what a dead worker left beyond its received rows (a
        hand-off it did not finish, a spool file it wrote but recorded no row for): rows are
        adopted one by one with a conditional UPDATE and rowless files inserted with ON
        CONFLICT, so of two workers reconciling at once only one takes each."""
        now = self._clock()
        open_groups = self.jobs.groups(OPEN)  # before the listing: their files are listed
        closing = {g.key for g in self.jobs.groups(CLOSING)}  # their closer has them
        live = self.jobs.live_owners(now) - {self.owner}
        files = self._spool.pending()
        names = {p.name for p in files}
        rows = self.jobs.rows(names)
        wall, old = time.time(), self.lease_s
        adopted = self.jobs.adopt([n for n, r in rows.items() if r.owner not in live
                                   and r.owner != self.owner and r.group_key not in closing],
                                  self.owner, now)
        if startup:  # what ``take_over`` just gave this worker, which holds nothing yet
            adopted |= {n for n, r in rows.items() if r.owner == self.owner}
        mine = [p for p in files if p.name in adopted or (
            p.name not in rows and ((startup and not live) or _age(p, wall) > old))]
        mine_names = {p.name for p in mine}
        received = [r for r in self.jobs.received() if r.name in adopted or (
            r.name not in names and r.owner not in live
            and (startup or r.owner != self.owner) and r.group_key not in closing)]
        plan = plan_recovery(mine, rows, received, open_groups, self._results.stored,
                             hand_on=self.sink is not None)
        held = {r.group_key for n, r in rows.items() if n not in mine_names}
        plan.close = [k for k in plan.close if k not in held]
        taken = self._apply(plan)
        plan.requeue = [j for j in plan.requeue if j.path.name in taken or j.path.name in rows]
        if startup and plan.rejoin:
            self.jobs.rearm({r.group.key for r in plan.rejoin},
                            self._clock() + self.policy.timeout_s)
        if mine:
            LOG.info("recovered %d acknowledged instances from the spool (%d open groups)",
                     len(mine), plan.open_groups)
        return plan.requeue

    def _apply(self, plan: RecoveryPlan) -> set[str]:
        """Apply the plan; the names of the rows it inserted (a row another worker inserted
        first is that worker's to run)."""
        for done in plan.finish:
            if done.lost:
                LOG.error("job %s was acknowledged but its spool file is gone", done.name)
            self.jobs.finish(done.name, done.state, done.reason)
        inserted = set()
        for new in plan.insert:
            if self.jobs.insert(new.name, new.study_uid, new.series_uid, new.sop_uid,
                                RECOVERED, owner=self.owner):
                inserted.add(new.name)
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
        return inserted

    def _scan(self) -> None:
        """Take over what workers whose lease ended left, and claim the due groups no live
        worker closed (their members may all be at another worker, or at a dead one)."""
        self._next_scan = self._clock() + self._scan_every
        try:
            self._retire_dead_neighbours(self._clock())
            taken = self.jobs.take_over(self.owner, self._clock())
            if taken:
                self._adopt(taken)
            if self._clock() >= self._next_reconcile:
                self._next_reconcile = self._clock() + 2 * self.lease_s
                for job in self._reconcile(startup=False):
                    self.submit(job)
            if self.groups.joins:  # a membership unrecorded: no group may close yet
                return
            for row in self.jobs.claim_due(self.owner, self._clock()):
                self._close_claimed(row)
                if self._stop.is_set():
                    return
        except Exception as exc:  # the table unreachable: tried again at the next scan
            LOG.error("job table scan failed: %s", type(exc).__name__)

    def _retire_dead_neighbours(self, now: float) -> None:
        """Leases of workers on this host whose process is gone (a gateway killed and
        restarted, a sibling process killed) end now, not when they expire: the owner id
        names host and pid. Elsewhere (other replicas) only the lease's expiry tells."""
        host = socket.gethostname()
        for owner in self.jobs.live_owners(now) - {self.owner}:
            where = owner.rpartition("-")[0]
            at, _, pid = where.rpartition("-")
            if at == host and pid.isdigit() and not pid_alive(int(pid)):
                LOG.info("worker %s is gone; taking over its jobs", owner)
                self.jobs.retire(owner)

    def _adopt(self, taken: list[JobRow]) -> None:
        """Received rows a dead worker left outside any group: queued here (finished from
        their stored result, or failed, when their spool file is gone)."""
        files = [p for r in taken if (p := self._spool.incoming / r.name).exists()]
        plan = plan_recovery(files, {r.name: r for r in taken}, taken, [],
                             self._results.stored, hand_on=self.sink is not None)
        self._apply(plan)
        LOG.info("took over %d jobs of a worker whose lease ended", len(taken))
        for job in plan.requeue:
            self.submit(job)

    # -- queue ------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._change_depth(+1)
        self._queue.put((job, self._clock()))

    def _change_depth(self, delta: int) -> None:
        with self._depth_lock:
            self._depth += delta
            self._metrics.spool_depth.set(self._depth)

    def stop(self) -> None:
        """Stop after the current item; the lease is given up, so the other workers take over
        what is left (a group in the middle of closing reopens for them)."""
        self._stop.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._beat.is_alive():
            self._beat.join(timeout=5)
        try:
            self.jobs.retire(self.owner)
        except Exception as exc:
            LOG.error("job table: giving up the lease failed: %s", type(exc).__name__)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                items = [self._queue.get(timeout=self.groups.wait_s(
                    min(self._next_prune, self._next_scan)))]
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
            if self._lease_lost.is_set():
                self._lease_lost.clear()
                self._drop_taken()
            self._close_due()
            if self._clock() >= self._next_scan and not self._stop.is_set():
                self._scan()
            if self._clock() >= self._next_prune:
                self._prune()

    def _guarded(self, job: Job, acked: float) -> None:
        try:
            self._arrive(job, acked)
        except JobDbUnavailable as exc:  # not the instance's fault: it waits, queued again
            LOG.error("job table unavailable (%s); instance %s queued again", exc,
                      job.path.name)
            self._stop.wait(self._backoff)
            self._queue.put((job, acked))
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
                         job.calling_aet, owner=self.owner)
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
            keys = self.jobs.join_groups(self.groups.joins, self.groups.dues())
        except Exception as exc:  # retried with the next batch; closing waits for it
            LOG.error("recording group memberships failed: %s", type(exc).__name__)
            self._stop.wait(self._backoff)
            return
        self.groups.joins_recorded(keys)

    def _close_due(self) -> None:
        for group in self.groups.due():  # none while a membership is unrecorded
            self._metrics.groups_open.set(self.groups.open_count)
            if group.persisted:
                try:
                    state, due = self.jobs.claim_group(group.key, self.owner, self._clock())
                except JobDbUnavailable as exc:  # tried again after a backoff
                    delay = self.groups.defer(group, self._backoff, MAX_BACKOFF_S)
                    LOG.error("group %s: job table unavailable (%s); retrying in %.2fs",
                              group.key, exc, delay)
                    break
                if state == LATER:  # a later arrival, maybe at another worker
                    self.groups.rearm(group, due)
                    continue
                if state != CLAIMED:  # another worker closed it, our members included
                    self._forget(group)
                    continue
                self._merge_members(group)
            self._close(group)
            if self._stop.is_set():
                break

    def _drop_taken(self) -> None:
        """After a lost lease: the groups in memory this worker no longer holds are dropped
        (an instance group whose row another worker took; a series or study group is asked
        of the table when due, ``claim_group``), and the table is read again at once (the
        next scan: take-over, due claims)."""
        for group in self.groups.closing():
            if group.persisted:
                continue
            rows = self.jobs.rows([m.name for m in group.members])
            if any(r.owner not in (None, self.owner) for r in rows.values()):
                self.groups.take(group.key)
                self._forget(group)
        self._next_scan = self._clock()

    def _forget(self, group: Group) -> None:
        self._change_depth(-len([m for m in group.members if self.groups.holds(m.name)]))
        self.groups.release(group)

    def _close_claimed(self, row: GroupRow) -> None:
        """A group claimed by the scan: this worker's own (taken out of its timers) or one
        whose members were spooled elsewhere, read from the shared spool."""
        group = self.groups.take(row.key)
        if group is None:
            group = Group(row.key, row.level, row.study_hash, row.series_hash, persisted=True)
        self._merge_members(group)
        if not group.members:  # every member finished and released already
            self.jobs.close_group(group.key, self.owner)
            return
        self._close(group)

    def _merge_members(self, group: Group) -> None:
        """Add the members other workers recorded in the table (their files are in the
        shared spool); a member whose file is gone is finished from its stored result, or
        failed as ``spool_missing``, never left pending."""
        have = {m.name for m in group.members}
        for row in self.jobs.members(group.key):
            if row.name in have:
                continue
            path = self._spool.incoming / row.name
            header = read_header(path) if path.exists() else None
            if header is None:
                if row.state == RECEIVED:
                    plan = plan_recovery([], {}, [row], [], self._results.stored,
                                         hand_on=False)
                    self._apply(plan)
                continue
            group.members.append(Member(Job(path=path, protocol=row.protocol,
                                            calling_aet=row.calling_aet), header, full=False))

    def _close(self, group: Group) -> None:
        """The runner closes the group; unfinished (stopping, or a sink that raised), it is
        kept and tried again when due."""
        outcome = self.runner.close(group)
        if outcome == "lost":  # another worker holds it now: its members are that one's
            self._forget(group)
        elif outcome == "stopping":
            self.groups.keep(group)  # ``recover`` takes it up again after a restart
        elif isinstance(outcome, Refused):
            delay = self.groups.defer(group, self._backoff, MAX_BACKOFF_S)
            LOG.warning("group %s not closed (%s); retrying in %.2fs", group.key,
                        outcome.error, delay)
        else:
            self._forget(group)




def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0
