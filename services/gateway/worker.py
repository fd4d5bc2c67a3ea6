"""Background worker: spooled instances -> inference -> stored results, in arrival order.

While Triton is unavailable the current instance is retried with capped exponential backoff;
it is never dropped, and the DIMSE edge keeps acknowledging only what reached the spool (up to
``max_depth``, then it refuses). An instance that fails for good gets an error result; one that
cannot even be read is quarantined. No exception ends the worker thread.

Every instance has a row in the job table (jobs.py). The order of the durable steps makes a
crash at any point recoverable without inferring a job twice: result file (naming the job) ->
row finished (one transaction, once) -> spool file removed. ``recover`` reconciles the spool
with the table at start-up, before any new work is taken.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from services.gateway.core import InferenceCore, complete_timings, parse, uid_hash
from services.gateway.errors import GatewayError, Unavailable
from services.gateway.grouping import GroupSink
from services.gateway.jobs import FAILED, FINAL, INFERRED, JobTable
from services.gateway.metrics import GatewayMetrics
from services.gateway.spool import ResultStore, Spool

LOG = logging.getLogger(__name__)
_MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class Job:
    path: Path
    protocol: str
    arrival: float | None = None  # perf_counter at arrival; None for work found at restart
    acked: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


class SpoolWorker:
    def __init__(self, core: InferenceCore, spool: Spool, results: ResultStore,
                 metrics: GatewayMetrics, backoff_s: float, jobs: JobTable | None = None,
                 sink: GroupSink | None = None) -> None:
        """``jobs`` defaults to the job table beside the spool. ``sink`` receives every
        completed group (grouping.py) before its spool files are released; None: a closed
        group just finishes."""
        self.jobs = jobs if jobs is not None else JobTable(spool.root)
        self.sink = sink
        self._core = core
        self._spool = spool
        self._results = results
        self._metrics = metrics
        self._backoff = backoff_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._depth = 0
        self._depth_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-worker", daemon=True)

    @property
    def depth(self) -> int:
        """Acknowledged instances not yet finished."""
        return self._depth

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        for job in self.recover():
            self.submit(job)
        self._thread.start()

    def recover(self) -> list[Job]:
        """Reconcile the spool with the job table after a stop, clean or not; the jobs to run.

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
        jobs = []
        for path in files:
            if self.jobs.get(path.name) is None:
                study, series, sop = _header_uids(path)
                self.jobs.insert(path.name, study, series, sop, "recovered")
            jobs.append(Job(path=path, protocol="recovered"))
        if jobs:
            LOG.info("recovered %d acknowledged instances from the spool", len(jobs))
        return jobs

    def submit(self, job: Job) -> None:
        self._change_depth(+1)
        self._queue.put(job)

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
            job = self._queue.get()
            if job is None:
                return
            try:
                finished = self._process(job)
            except Exception as exc:  # a bug must not stop the queue behind this instance
                LOG.exception("unexpected %s on a spooled instance; quarantined",
                              type(exc).__name__)
                try:
                    self._give_up(job, None, GatewayError("internal error", "internal"))
                except Exception:  # e.g. the disk itself failing: keep serving the queue
                    LOG.exception("could not quarantine spooled instance %s", job.path.name)
                finished = True
            if finished:
                self._change_depth(-1)

    def _already_done(self, job: Job) -> bool:
        """Finish a job that a previous run finished, or whose result it stored, without
        inferring again (crash-recovery paths; see the module docstring)."""
        name = job.path.name
        row = self.jobs.get(name)
        if row is None:
            return False
        if row.state in FINAL:  # finished, crashed before the spool file was removed
            self._spool.remove(job.path)
            return True
        doc = self._results.stored(row.study_hash, row.sop_hash)
        if doc is None or doc.get(ResultStore.JOB_KEY) != name:
            return False
        error = doc.get("error")
        self.jobs.finish(name, FAILED if error else INFERRED,
                         error.get("reason") if isinstance(error, dict) else None)
        self._spool.remove(job.path)
        LOG.info("job %s: result already stored before a restart; not inferred again", name)
        return True

    def _process(self, job: Job) -> bool:
        """True when the job is finished (result stored); False only when stopping."""
        if self._already_done(job):
            return True
        name = job.path.name
        try:
            ds = parse(job.path.read_bytes())
        except GatewayError as exc:  # checked before the ack, so only a damaged spool file
            self._give_up(job, None, exc)
            return True
        self.jobs.insert(name, str(ds.get("StudyInstanceUID", "")),  # no-op when acked here
                         str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", "")),
                         job.protocol)
        backoff = self._backoff
        error: str | None = None
        while not self._stop.is_set():
            start = time.perf_counter()
            timings = dict(job.timings_ms)
            if job.acked is not None:
                timings["queue"] = (start - job.acked) * 1000.0
            self.jobs.attempt(name, error)
            try:
                result = self._core.analyze(ds, timings)
            except Unavailable as exc:
                error = exc.reason
                LOG.warning("inference unavailable (%s); retrying spooled instance in %.1fs",
                            exc.reason, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            except GatewayError as exc:
                self._give_up(job, ds, exc)
                return True
            origin = job.arrival if job.arrival is not None else start
            complete_timings(result.timings_ms, origin, time.perf_counter())
            self._results.save(result.study_instance_uid, result.sop_instance_uid,
                               result.to_dict(), job=name)
            self.jobs.finish(name, INFERRED)
            self._spool.remove(job.path)
            self._metrics.observe(self._core.manifest.name, job.protocol, result.timings_ms)
            self._metrics.requests.labels(job.protocol, "inferred", "ok").inc()
            return True
        return False

    def _give_up(self, job: Job, ds: Dataset | None, exc: GatewayError) -> None:
        """Store an error result when the instance is identifiable; else quarantine the file."""
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
            self._spool.remove(job.path)
        elif job.path.exists():
            self.jobs.finish(name, FAILED, exc.reason)
            self._spool.quarantine(job.path)
        self._metrics.requests.labels(job.protocol, "failed", exc.reason).inc()


def _header_uids(path: Path) -> tuple[str, str, str]:
    """Study, series and SOP Instance UIDs from a spooled file's header; empty when unreadable
    (the worker then quarantines the file)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        return (str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", "")),
                str(header.get("SOPInstanceUID", "")))
    except Exception:  # damaged file: any pydicom error
        return "", "", ""
