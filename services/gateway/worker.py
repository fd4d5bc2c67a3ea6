"""Background worker: spooled instances -> inference -> stored results, in arrival order.

While Triton is unavailable the current instance is retried with capped exponential backoff;
it is never dropped, and the DIMSE edge keeps acknowledging only what reached the spool (up to
``max_depth``, then it refuses). An instance that fails for good gets an error result; one that
cannot even be read is quarantined. No exception ends the worker thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from services.gateway.core import InferenceCore, complete_timings, parse, uid_hash
from services.gateway.errors import GatewayError, Unavailable
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
                 metrics: GatewayMetrics, backoff_s: float) -> None:
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
        for path in self._spool.pending():
            self.submit(Job(path=path, protocol="recovered"))
        self._thread.start()

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
                self._give_up(job, None, GatewayError("internal error", "internal"))
                finished = True
            if finished:
                self._change_depth(-1)

    def _process(self, job: Job) -> bool:
        """True when the job is finished (result stored); False only when stopping."""
        try:
            ds = parse(job.path.read_bytes())
        except GatewayError as exc:  # checked before the ack, so only a damaged spool file
            self._give_up(job, None, exc)
            return True
        backoff = self._backoff
        while not self._stop.is_set():
            start = time.perf_counter()
            timings = dict(job.timings_ms)
            if job.acked is not None:
                timings["queue"] = (start - job.acked) * 1000.0
            try:
                result = self._core.analyze(ds, timings)
            except Unavailable:
                LOG.warning("inference unavailable; retrying spooled instance in %.1fs", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            except GatewayError as exc:
                self._give_up(job, ds, exc)
                return True
            origin = job.arrival if job.arrival is not None else start
            complete_timings(result.timings_ms, origin, time.perf_counter())
            self._results.save(result.study_instance_uid, result.sop_instance_uid,
                               result.to_dict())
            self._spool.remove(job.path)
            self._metrics.observe(self._core.manifest.name, job.protocol, result.timings_ms)
            self._metrics.requests.labels(job.protocol, "inferred", "ok").inc()
            return True
        return False

    def _give_up(self, job: Job, ds: Dataset | None, exc: GatewayError) -> None:
        """Store an error result when the instance is identifiable; else quarantine the file."""
        LOG.warning("spooled instance %s failed: %s", job.path.name, exc.reason)
        study = str(ds.get("StudyInstanceUID", "")) if ds is not None else ""
        sop = str(ds.get("SOPInstanceUID", "")) if ds is not None else ""
        if study and sop:
            self._results.save(study, sop, {
                "study_instance_uid": study, "sop_instance_uid": sop,
                "error": {"reason": exc.reason, "message": str(exc)},
            })
            LOG.info("stored error result for instance %s", uid_hash(sop))
            self._spool.remove(job.path)
        elif job.path.exists():
            self._spool.quarantine(job.path)
        self._metrics.requests.labels(job.protocol, "failed", exc.reason).inc()
