"""Background worker: spooled instances -> groups -> selection -> inference -> stored results
-> the group sink (delivery outbox), in arrival order.

Grouping (grouping.py, ``GroupingPolicy``): at level ``instance`` every instance is a group of
its own, inferred as soon as it is taken (the behaviour before grouping existed). At level
``series`` or ``study`` an instance joins the open group of its series (study); the group
closes when no instance of it was acknowledged for ``timeout_s`` (monotonic clock). At close
the group's series are put in slice order, checked against the manifest's selection rules (a
series failing one is ``skipped``, its jobs finished with the rule as the reason) and inferred,
per instance or as one item per series (a 3-D model gets the series volume, a 2-D model the
middle slice). Open groups live in the job table (``groups``, ``jobs.group_key``), so a
restart reopens them and re-arms their timers from the restart.

While Triton is unavailable the current item is retried with capped exponential backoff; it is
never dropped, and the DIMSE edge keeps acknowledging only what reached the spool (up to
``max_depth``, then it refuses). An item that fails for good gets an error result; a file that
cannot even be read is quarantined. No exception ends the worker thread.

The order of the durable steps makes a crash at any point recoverable without inferring a job
twice: result file (naming the job, or the group for a series result) -> rows finished (one
transaction, once) -> ``sink.accept`` (the sink records the group durably before returning;
a sink that raises is retried with backoff, never skipped) -> group closed -> spool files
removed. ``recover`` reconciles the spool with the table at start-up, before any new work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from optimizer.errors import PreprocessError
from optimizer.preprocess import preprocess_frames
from services.gateway.dicom.parsing import parse
from services.gateway.errors import GatewayError, InvalidInstance, Unavailable
from services.gateway.inference.core import InferenceCore, Result, complete_timings
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import uid_hash
from services.gateway.processing.grouping import (
    CompletedGroup,
    GroupingPolicy,
    GroupSink,
    group_key,
    not_selected,
    series_volume,
    slice_order,
)
from services.gateway.store.durable import fsync_dir
from services.gateway.store.jobs import (
    DELIVERED,
    FAILED,
    FINAL,
    INFERRED,
    OPEN,
    RECEIVED,
    SKIPPED,
    GroupRow,
    JobRow,
    JobTable,
)
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool

LOG = logging.getLogger(__name__)
_MAX_BACKOFF_S = 5.0
_PRUNE_EVERY_S = 3600.0
_UIDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


@dataclass(frozen=True)
class Job:
    path: Path
    protocol: str
    arrival: float | None = None  # perf_counter at arrival; None for work found at restart
    acked: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    calling_aet: str | None = None  # DIMSE calling AE title; None for HTTP edges


@dataclass
class _Member:
    job: Job
    ds: Dataset  # the header (series/study groups) or the whole instance (instance level)
    full: bool

    @property
    def name(self) -> str:
        return self.job.path.name

    def uid(self, keyword: str) -> str:
        return str(self.ds.get(keyword, ""))


@dataclass
class _Group:
    key: str
    level: str
    study_hash: str
    series_hash: str  # "" for a study group
    persisted: bool  # a row in the table's ``groups`` (series and study levels)
    members: list[_Member] = field(default_factory=list)
    due: float = 0.0  # monotonic time at which it closes (or retries its sink)
    sink_backoff: float = 0.0


class SpoolWorker:
    def __init__(self, core: InferenceCore, spool: Spool, results: ResultStore,
                 metrics: GatewayMetrics, backoff_s: float, jobs: JobTable | None = None,
                 sink: GroupSink | None = None, policy: GroupingPolicy | None = None,
                 retention_s: float = 7 * 86400.0) -> None:
        """``jobs`` defaults to the job table beside the spool. ``sink`` receives every
        completed group (grouping.py) before its spool files are released; None: a closed
        group just finishes. ``policy`` defaults to the manifest's own; ``retention_s`` is how
        long finished rows stay in the job table."""
        self.jobs = jobs if jobs is not None else JobTable(spool.root)
        self.sink = sink
        self.policy = policy if policy is not None else GroupingPolicy.resolve(core.manifest)
        self._retention = retention_s
        self._core = core
        self._spool = spool
        self._results = results
        self._metrics = metrics
        self._backoff = backoff_s
        self._maps = spool.root / "maps"
        self._queue: queue.Queue[tuple[Job, float] | None] = queue.Queue()
        self._depth = 0
        self._depth_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-worker", daemon=True)
        # worker-thread state (filled by ``start`` before the thread runs)
        self._open: dict[tuple[str, str, str], _Group] = {}
        self._closing: dict[str, _Group] = {}
        self._held: set[str] = set()  # job names in open or closing groups
        self._joins: list[tuple[str, str, str, str, str]] = []  # memberships to record
        self._next_prune = 0.0

    @property
    def depth(self) -> int:
        """Acknowledged instances not yet finished (open groups included)."""
        return self._depth

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def open_groups(self) -> int:
        return len(self._open)

    def start(self) -> None:
        for job in self.recover():
            self.submit(job)
        self._prune()
        self._thread.start()

    # -- start-up ---------------------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Reconcile the spool with the job table after a stop, clean or not; the jobs to run
        as new arrivals. Members of open groups rejoin their group (timer re-armed from now);
        finished instances whose group was not handed on yet are handed on again.

        A spool file without a row (crash between spooling and the insert) gets one; a row
        still ``received`` whose spool file is gone (which the order of the steps rules out)
        is finished from its stored result if this job wrote one, else marked failed
        (``spool_missing``) and logged, never left pending for ever."""
        files = self._spool.pending()
        names = {p.name for p in files}
        for row in self.jobs.received():
            if row.name in names:
                continue
            doc = self._results.stored(row.study_hash, row.sop_hash)
            if doc is not None and doc.get(ResultStore.JOB_KEY) == row.name:
                self.jobs.finish(row.name, FAILED if "error" in doc else INFERRED,
                                 doc["error"].get("reason") if "error" in doc else None)
            else:
                LOG.error("job %s was acknowledged but its spool file is gone", row.name)
                self.jobs.finish(row.name, FAILED, "spool_missing")
        open_groups = {g.key: g for g in self.jobs.groups(OPEN)}
        now = time.monotonic()
        jobs = []
        for path in files:
            found = self.jobs.get(path.name)
            if found is None:
                study, series, sop = _header_uids(path)
                self.jobs.insert(path.name, study, series, sop, "recovered")
                found = self.jobs.get(path.name)
            assert found is not None
            row = found
            job = Job(path=path, protocol="recovered", calling_aet=row.calling_aet)
            if row.group_key is not None and row.group_key in open_groups:
                self._rejoin(job, open_groups[row.group_key], now)
            elif row.state in FINAL and row.group_key is not None:
                self._spool.remove(path)  # its group was closed: only the removal was left
            elif row.state in FINAL:  # instance level, finished, not handed on yet
                self._rehand(job, row, now)
            else:
                jobs.append(job)
        rejoined = {grp.key for grp in self._open.values()}
        for key in open_groups:
            if key not in rejoined:
                self.jobs.close_group(key)  # no member left on disk
        if files:
            LOG.info("recovered %d acknowledged instances from the spool (%d open groups)",
                     len(files), len(self._open))
        return jobs

    def _rejoin(self, job: Job, g: GroupRow, now: float) -> None:
        header = _read_header(job.path)
        if header is None:  # a damaged file in an open group: handled as a new arrival
            self.submit(job)
            return
        ident = (g.level, g.study_hash, g.series_hash)
        group = self._open.get(ident)
        if group is None:
            group = self._open[ident] = _Group(g.key, g.level, g.study_hash, g.series_hash,
                                               persisted=True)
        group.members.append(_Member(job, header, full=False))
        self._held.add(job.path.name)
        group.due = now + self.policy.timeout_s
        self._change_depth(+1)
        self._metrics.groups_open.set(len(self._open))

    def _rehand(self, job: Job, row: JobRow, now: float) -> None:
        if self.sink is None:
            self._spool.remove(job.path)
            return
        header = _read_header(job.path)
        if header is None:
            self._spool.remove(job.path)
            return
        group = _Group(group_key("instance", row.study_hash, row.series_hash, row.name),
                       "instance", row.study_hash, row.series_hash, persisted=False,
                       members=[_Member(job, header, full=False)], due=now)
        self._closing[group.key] = group
        self._held.add(job.path.name)
        self._change_depth(+1)

    # -- queue ------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._change_depth(+1)
        self._queue.put((job, time.monotonic()))

    def _change_depth(self, delta: int) -> None:
        with self._depth_lock:
            self._depth += delta
            self._metrics.spool_depth.set(self._depth)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _wait_s(self) -> float:
        dues = [g.due for g in self._open.values()] + [g.due for g in self._closing.values()]
        return max(0.0, min([*dues, self._next_prune]) - time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                items = [self._queue.get(timeout=self._wait_s())]
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
            if time.monotonic() >= self._next_prune:
                self._prune()

    def _guarded(self, job: Job, acked: float) -> None:
        try:
            self._arrive(job, acked)
        except Exception as exc:  # a bug must not stop the queue behind this instance
            LOG.exception("unexpected %s on a spooled instance; quarantined",
                          type(exc).__name__)
            try:
                self._give_up(job, None, GatewayError("internal error", "internal"))
            except Exception:  # e.g. the disk itself failing: keep serving the queue
                LOG.exception("could not quarantine spooled instance %s", job.path.name)
            self._held.discard(job.path.name)
            self._change_depth(-1)

    def _prune(self) -> None:
        self._next_prune = time.monotonic() + _PRUNE_EVERY_S
        try:
            self.jobs.prune(self._retention, keep={p.name for p in self._spool.pending()})
        except Exception as exc:  # pruning is housekeeping: never stop the worker for it
            LOG.error("job table pruning failed: %s", type(exc).__name__)

    # -- arrivals ---------------------------------------------------------------------------

    def _arrive(self, job: Job, acked: float) -> None:
        name = job.path.name
        level = self.policy.level
        if name in self._held:  # submitted twice: the group it is in finishes it
            self._change_depth(-1)
            return
        if level == "instance":
            try:
                ds = parse(job.path.read_bytes())
            except GatewayError as exc:  # checked before the ack, so only a damaged file
                self._give_up(job, None, exc)
                self._change_depth(-1)
                return
        else:
            header = _read_header(job.path)
            if header is None:
                self._give_up(job, None, InvalidInstance("unreadable DICOM file",
                                                         "unreadable"))
                self._change_depth(-1)
                return
            ds = header
        member = _Member(job, ds, full=level == "instance")
        study, series, sop = (member.uid(k) for k in _UIDS)
        self.jobs.insert(name, study, series, sop, job.protocol,  # no-op when acked here
                         job.calling_aet)
        study_h, series_h = _h(study), _h(series) if level != "study" else ""
        if level == "instance":
            group = _Group(group_key(level, study_h, series_h, name), level, study_h,
                           series_h, persisted=False, members=[member])
            self._held.add(name)
            self._close(group)
            return
        ident = (level, study_h, series_h)
        opened = self._open.get(ident)
        if opened is None:
            opened = self._open[ident] = _Group(group_key(level, study_h, series_h, name),
                                                level, study_h, series_h, persisted=True)
            self._metrics.groups_open.set(len(self._open))
            LOG.info("group %s opened (%s)", opened.key, level)
        self._joins.append((opened.key, level, study_h, series_h, name))
        opened.members.append(member)
        self._held.add(name)
        opened.due = max(opened.due, acked + self.policy.timeout_s)

    def _record_joins(self) -> None:
        """New memberships, one transaction per batch of arrivals (before any member can be
        finished). Not yet recorded at a crash: the rows are still ``received`` without a
        group, so a restart groups them again; nothing is lost or inferred twice."""
        if not self._joins:
            return
        try:
            self.jobs.join_groups(self._joins)
        except Exception as exc:  # retried with the next batch; closing waits for it
            LOG.error("recording group memberships failed: %s", type(exc).__name__)
            self._stop.wait(self._backoff)
            return
        self._joins = []

    def _close_due(self) -> None:
        if self._joins:  # a membership must be on disk before its group closes
            return
        now = time.monotonic()
        for ident, group in list(self._open.items()):
            if group.due <= now and not self._stop.is_set():
                del self._open[ident]
                self._metrics.groups_open.set(len(self._open))
                self._close(group)
        for key, group in list(self._closing.items()):
            if group.due <= now and not self._stop.is_set():
                del self._closing[key]
                self._close(group)

    # -- closing a group --------------------------------------------------------------------

    def _close(self, group: _Group) -> None:
        """Select, infer what is left to infer, hand on, release. Unfinished (stopping, or a
        sink that raised): kept in ``_closing`` and tried again. No exception escapes: a bug
        quarantines what was left unfinished and releases the group."""
        try:
            self._close_unguarded(group)
        except Exception as exc:
            LOG.exception("unexpected %s closing group %s; its unfinished instances are "
                          "quarantined", type(exc).__name__, group.key)
            for m in group.members:
                with contextlib.suppress(Exception):
                    row = self.jobs.get(m.name)
                    if row is not None and row.state == RECEIVED:
                        self._give_up(m.job, None, GatewayError("internal error", "internal"))
                    elif m.job.path.exists():
                        self._spool.remove(m.job.path)
            with contextlib.suppress(Exception):
                if group.persisted:
                    self.jobs.close_group(group.key)
            self._release(group)

    def _close_unguarded(self, group: _Group) -> None:
        if not self._settle(group):
            self._closing[group.key] = group  # stopping: ``recover`` takes it up again
            return
        completed = self._completed(group) if self.sink is not None else None
        if self.sink is not None and completed is not None and completed.results:
            try:
                self.sink.accept(completed)
            except Exception as exc:  # the sink says "later": retry, never drop
                group.sink_backoff = min(max(group.sink_backoff * 2, self._backoff),
                                         _MAX_BACKOFF_S)
                group.due = time.monotonic() + group.sink_backoff
                self._closing[group.key] = group
                self._metrics.group_sink_errors.labels(group.level).inc()
                LOG.warning("group %s: sink refused (%s); retrying in %.2fs", group.key,
                            type(exc).__name__, group.sink_backoff)
                return
        if group.persisted:
            self.jobs.close_group(group.key)
        for m in group.members:
            self._spool.remove(m.job.path)
        for path in self._maps.glob(f"{group.key}-*.npy") if self._maps.is_dir() else ():
            path.unlink(missing_ok=True)
        for m in group.members:
            (self._maps / f"{m.name}.npy").unlink(missing_ok=True)
        self._metrics.groups_closed.labels(group.level, self._outcome(group)).inc()
        if group.persisted:
            LOG.info("group %s closed (%d instances)", group.key, len(group.members))
        self._release(group)

    def _release(self, group: _Group) -> None:
        self._change_depth(-len(group.members))
        self._held.difference_update(m.name for m in group.members)

    def _outcome(self, group: _Group) -> str:
        states = {r.state for m in group.members if (r := self.jobs.get(m.name)) is not None}
        if states & {INFERRED, DELIVERED}:
            return "inferred"
        return "failed" if FAILED in states else "skipped"

    def _series(self, group: _Group) -> list[list[_Member]]:
        """The group's members by series (first arrival first), each in slice order."""
        by_series: dict[str, list[_Member]] = {}
        for m in group.members:
            by_series.setdefault(m.uid("SeriesInstanceUID"), []).append(m)
        return [[ms[i] for i in slice_order([m.ds for m in ms])] for ms in by_series.values()]

    def _settle(self, group: _Group) -> bool:
        """Every member finished (inferred, failed or skipped); False only when stopping."""
        for series in self._series(group):
            rows = {m.name: self.jobs.get(m.name) for m in series}
            waiting = [m for m in series
                       if (r := rows[m.name]) is not None and r.state == RECEIVED]
            if not waiting:
                continue  # finished before a restart
            reason = not_selected(self.policy.selection, [m.ds for m in series])
            if reason is not None:
                self._skip(group, series, waiting, reason)
                continue
            if self.policy.infer == "series":
                if not self._infer_series(group, series, waiting):
                    return False
                continue
            for m in waiting:
                if not self._infer_instance(m):
                    return False
        return True

    def _skip(self, group: _Group, series: list[_Member], waiting: list[_Member],
              reason: str) -> None:
        """A series the manifest's rules leave out: a ``skipped`` note in the results (not an
        error; per instance at level ``instance``, else per series) and its jobs finished as
        ``skipped`` with the rule as the reason."""
        first = series[0]
        doc: dict[str, Any] = {
            "study_instance_uid": first.uid("StudyInstanceUID"),
            "series_instance_uid": first.uid("SeriesInstanceUID"),
            "skipped": {"reason": reason, "instances": len(series),
                        "message": "the model's selection rules leave this series out"},
        }
        if group.level == "instance":
            doc["sop_instance_uid"] = first.uid("SOPInstanceUID")
            self._results.save(doc["study_instance_uid"], doc["sop_instance_uid"], doc,
                               job=first.name)
        else:
            self._results.save(doc["study_instance_uid"], doc["series_instance_uid"], doc,
                               job=group.key)
        self.jobs.finish_many([m.name for m in waiting], SKIPPED, reason)
        for m in waiting:
            self._metrics.requests.labels(m.job.protocol, "skipped", reason).inc()
        LOG.info("series %s skipped: %s", uid_hash(first.uid("SeriesInstanceUID")), reason)

    def _retrying(self, name: str, call: Any) -> Result | None:
        """``call()`` until it is not Unavailable (capped exponential backoff); None only
        when stopping. Other GatewayErrors propagate."""
        backoff = self._backoff
        error: str | None = None
        while not self._stop.is_set():
            self.jobs.attempt(name, error)
            try:
                return call()
            except Unavailable as exc:
                error = exc.reason
                LOG.warning("inference unavailable (%s); retrying in %.1fs", exc.reason,
                            backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        return None

    def _from_stored(self, doc: dict[str, Any] | None, tag: str, names: list[str]) -> bool:
        """Finish jobs whose result a previous run stored (crash before ``finish``)."""
        if doc is None or doc.get(ResultStore.JOB_KEY) != tag:
            return False
        error = doc.get("error")
        self.jobs.finish_many(names, FAILED if error else INFERRED,
                              error.get("reason") if isinstance(error, dict) else None)
        LOG.info("job %s: result already stored before a restart; not inferred again", tag)
        return True

    def _infer_instance(self, m: _Member) -> bool:
        """One instance -> one result; False only when stopping."""
        job, name = m.job, m.name
        if self._from_stored(self._results.stored(_h(m.uid("StudyInstanceUID")),
                                                  _h(m.uid("SOPInstanceUID"))), name, [name]):
            return True
        if not m.full:
            try:
                m.ds, m.full = parse(job.path.read_bytes()), True
            except GatewayError as exc:
                self._give_up(job, None, exc, release=False)
                return True
        start = time.perf_counter()
        timings = dict(job.timings_ms)
        if job.acked is not None:
            timings["queue"] = (start - job.acked) * 1000.0
        try:
            result = self._retrying(name, lambda: self._core.analyze(m.ds, timings))
        except GatewayError as exc:
            self._give_up(job, m.ds, exc, release=False)
            return True
        if result is None:
            return False
        origin = job.arrival if job.arrival is not None else start
        complete_timings(result.timings_ms, origin, time.perf_counter())
        self._save_maps(name, result)
        self._results.save(result.study_instance_uid, result.sop_instance_uid,
                           result.to_dict(), job=name)
        self.jobs.finish(name, INFERRED)
        self._metrics.observe(self._core.manifest.name, job.protocol, result.timings_ms)
        self._metrics.requests.labels(job.protocol, "inferred", "ok").inc()
        return True

    def _infer_series(self, group: _Group, series: list[_Member],
                      waiting: list[_Member]) -> bool:
        """One series (slice order) -> one result, stored under the series' UID and naming
        the group; False only when stopping."""
        first = series[0]
        study_uid, series_uid = first.uid("StudyInstanceUID"), first.uid("SeriesInstanceUID")
        names = [m.name for m in waiting]
        if self._from_stored(self._results.stored(_h(study_uid), _h(series_uid)), group.key,
                             names):
            return True
        readable = []
        for m in series:
            try:
                if not m.full:
                    m.ds, m.full = parse(m.job.path.read_bytes()), True
                readable.append(m)
            except GatewayError as exc:
                if m in waiting:
                    self._give_up(m.job, None, exc, release=False)
                    names.remove(m.name)
        if not readable:
            return True
        middle = readable[len(readable) // 2]
        spec = self._core.manifest.input
        start = time.perf_counter()

        def infer() -> Result:
            if spec.depth is None:  # 2-D model: the middle slice stands for the series
                return self._core.analyze(middle.ds, {})
            t0 = time.perf_counter()
            slices = []
            for m in readable:
                self._core.check(m.ds)
                slices.append(_slice_input(m.ds, self._core))
            return self._core.analyze_input(middle.ds, series_volume(slices, spec.depth), {},
                                            t0)

        try:
            result = self._retrying(middle.name, infer)
        except GatewayError as exc:
            LOG.warning("series %s failed: %s", uid_hash(series_uid), exc.reason)
            self._results.save(study_uid, series_uid, {
                "study_instance_uid": study_uid, "series_instance_uid": series_uid,
                "inferred_on": "series",
                "error": {"reason": exc.reason, "message": str(exc)},
            }, job=group.key)
            self.jobs.finish_many(names, FAILED, exc.reason)
            for m in waiting:
                self._metrics.requests.labels(m.job.protocol, "failed", exc.reason).inc()
            return True
        if result is None:
            return False
        complete_timings(result.timings_ms, start, time.perf_counter())
        self._save_maps(f"{group.key}-{_h(series_uid)}", result)
        doc = {**result.to_dict(), "inferred_on": "series", "instances": len(readable),
               "source_sop_instance_uids": [m.uid("SOPInstanceUID") for m in readable]}
        self._results.save(study_uid, series_uid, doc, job=group.key)
        self.jobs.finish_many(names, INFERRED)
        self._metrics.observe(self._core.manifest.name, middle.job.protocol, result.timings_ms)
        for m in waiting:
            self._metrics.requests.labels(m.job.protocol, "inferred", "ok").inc()
        LOG.info("series %s inferred as one item (%d instances)", uid_hash(series_uid),
                 len(readable))
        return True

    def _save_maps(self, stem: str, result: Result) -> None:
        """Segmentation maps for the sink, durable before the result that they go with."""
        if result.maps is None or self.sink is None:
            return
        self._maps.mkdir(exist_ok=True)
        path = self._maps / f"{stem}.npy"
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            np.save(fh, result.maps)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(self._maps)

    def _completed(self, group: _Group) -> CompletedGroup:
        """What the sink gets: stored results of the inferred items (errors included; skipped
        series are not results), their source files in slice order, maps, protocols, AEs."""
        results: list[dict[str, Any]] = []
        sources: list[Path] = []
        maps: list[Path] = []
        rows = {m.name: self.jobs.get(m.name) for m in group.members}
        first = group.members[0]
        study_uid = first.uid("StudyInstanceUID")
        series_uids = []
        for series in self._series(group):
            series_uid = series[0].uid("SeriesInstanceUID")
            series_uids.append(series_uid)
            doc = self._results.stored(_h(study_uid), _h(series_uid))
            if doc is not None and doc.get(ResultStore.JOB_KEY) == group.key:
                if "skipped" in doc:
                    continue
                results.append({k: v for k, v in doc.items() if k != ResultStore.JOB_KEY})
                sources.extend(m.job.path for m in series if m.job.path.exists())
                maps.append(self._maps / f"{group.key}-{_h(series_uid)}.npy")
                continue
            for m in series:
                doc = self._results.stored(_h(study_uid), _h(m.uid("SOPInstanceUID")))
                if doc is None or doc.get(ResultStore.JOB_KEY) != m.name or "skipped" in doc:
                    continue
                results.append({k: v for k, v in doc.items() if k != ResultStore.JOB_KEY})
                sources.append(m.job.path)
                maps.append(self._maps / f"{m.name}.npy")
        protocols = {r.protocol for r in rows.values() if r is not None}
        aets = {r.calling_aet for r in rows.values() if r is not None and r.calling_aet}
        return CompletedGroup(
            key=group.key, level=group.level, study_uid=study_uid,
            series_uids=tuple(series_uids), job_names=tuple(m.name for m in group.members),
            sources=tuple(sources), results=tuple(results),
            maps=tuple(p for p in maps if p.exists()),
            protocols=tuple(sorted(protocols)), calling_aets=tuple(sorted(aets)),
        )

    def _give_up(self, job: Job, ds: Dataset | None, exc: GatewayError,
                 release: bool = True) -> None:
        """Store an error result when the instance is identifiable; else quarantine the file.
        ``release`` False: the group's close removes the spool file, not this."""
        LOG.warning("spooled instance %s failed: %s", job.path.name, exc.reason)
        name = job.path.name
        study = str(ds.get("StudyInstanceUID", "")) if ds is not None else ""
        sop = str(ds.get("SOPInstanceUID", "")) if ds is not None else ""
        self.jobs.insert(name, study, "", sop, job.protocol)  # no-op when the row exists
        if study and sop:
            self._results.save(study, sop, {
                "study_instance_uid": study, "sop_instance_uid": sop,
                "error": {"reason": exc.reason, "message": str(exc)},
            }, job=name)
            LOG.info("stored error result for instance %s", uid_hash(sop))
            self.jobs.finish(name, FAILED, exc.reason)
            if release:
                self._spool.remove(job.path)
        elif job.path.exists():
            self.jobs.finish(name, FAILED, exc.reason)
            self._spool.quarantine(job.path)
        self._metrics.requests.labels(job.protocol, "failed", exc.reason).inc()


def _h(uid: str) -> str:
    return uid_hash(uid) if uid else ""


def _slice_input(ds: Dataset, core: InferenceCore) -> np.ndarray:
    """One slice of a series for a 3-D model: preprocessed as a 2-D image, (1, C, H, W)."""
    spec = replace(core.manifest.input, depth=None, frames="middle")
    try:
        return preprocess_frames(ds, spec, header_checked=True)
    except PreprocessError as exc:
        raise InvalidInstance(str(exc), "bad_pixels") from exc


def _read_header(path: Path) -> Dataset | None:
    """A spooled file's header (no pixels), or None when unreadable."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # damaged file: any pydicom error
        return None


def _header_uids(path: Path) -> tuple[str, str, str]:
    """Study, series and SOP Instance UIDs from a spooled file's header; empty when unreadable
    (the worker then quarantines the file)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_UIDS)
        return (str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", "")),
                str(header.get("SOPInstanceUID", "")))
    except Exception:  # damaged file: any pydicom error
        return "", "", ""
