"""Closing a group: selection -> inference (retried while Triton is unavailable) -> stored results
-> the hand-off to the group sink -> the group closed and its spool files released.

At close the group's series are put in slice order and checked against the manifest's selection
rules (a series failing one is ``skipped``, its jobs finished with the rule as the reason); the
rest is inferred per instance, or as one item per series (a 3-D model gets the series volume, a
2-D model the middle slice); order, rules and volume are the model contract's
(``optimizer.contract.series``). While Triton is unavailable the current item is retried with
capped exponential backoff; it is never dropped. An item that fails for good gets an error
result; a file that cannot even be read is quarantined. No exception escapes ``Runner.close``.

The order of the durable steps makes a crash at any point recoverable without inferring a job
twice (recovery.py reads it back): result file (naming the job, or the group for a series
result) -> rows finished (one transaction, once) -> ``sink.accept`` (the sink records the group
durably before returning; a sink that raises is retried by the worker with backoff, never
skipped) -> group closed -> spool files removed. A result already stored under the job's (or the
group's) name at close finishes the jobs without inferring again.

PHI: logs name job names, group keys and hashed UIDs only; raw UIDs go into the result documents
and the ``CompletedGroup`` (in memory), never into logs or metric labels.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydicom.dataset import Dataset

from optimizer.contract.errors import PreprocessError
from optimizer.contract.series import not_selected, series_volume, slice_input, slice_order
from services.gateway.dicom.parsing import parse
from services.gateway.errors import GatewayError, InvalidInstance, Unavailable
from services.gateway.inference.core import InferenceCore, Result, complete_timings
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import uid_hash
from services.gateway.processing.grouping import CompletedGroup, GroupingPolicy, GroupSink
from services.gateway.processing.groups import Group, Job, Member, hashed
from services.gateway.store.durable import remove_stale_temporaries
from services.gateway.store.jobdb import JobDbUnavailable
from services.gateway.store.jobs import (
    DELIVERED,
    FAILED,
    INFERRED,
    RECEIVED,
    SKIPPED,
    JobTable,
)
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool, write_durably

LOG = logging.getLogger(__name__)
MAX_BACKOFF_S = 5.0


class Stopping(Protocol):
    """What the runner needs of the worker's stop flag (``threading.Event`` is one): whether
    it is set, and a wait that returns early when it is."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True)
class Refused:
    """The sink raised, or the job table did not answer: the group is kept (results stored,
    files in the spool) for a retry."""

    error: str  # the exception's class name (a message may carry PHI)


Closing = Literal["closed", "stopping", "lost"] | Refused


class Runner:
    def __init__(self, core: InferenceCore, spool: Spool, results: ResultStore, jobs: JobTable,
                 metrics: GatewayMetrics, policy: GroupingPolicy, sink: GroupSink | None,
                 backoff_s: float, stop: Stopping, owner: str | None = None) -> None:
        """``sink`` None: a closed group just finishes (no maps are kept for it either).
        ``backoff_s`` is the first wait while Triton is unavailable; ``stop`` ends the retries.
        ``owner``: the worker whose claims this runner closes; its rows are finished and its
        groups closed only while that claim holds (None: unconditionally, one worker alone)."""
        self.core = core
        self.spool = spool
        self.results = results
        self.jobs = jobs
        self.metrics = metrics
        self.policy = policy
        self.sink = sink
        self.backoff_s = backoff_s
        self.maps = spool.root / "maps"
        # a map write a crash stopped before its rename (old: not another process's write)
        remove_stale_temporaries(self.maps.glob("*.tmp"))
        self._stop = stop
        self.owner = owner

    def close(self, group: Group) -> Closing:
        """Select, infer what is left to infer, hand on, release the spool files: "closed";
        "stopping" when stopped before every member finished; ``Refused`` when the sink raised;
        "lost" when another worker took the claim over (this worker's lease had expired): then
        nothing is handed on, closed or released here, the new holder does it.
        No exception escapes: a bug quarantines what was left unfinished and closes the group."""
        try:
            return self._close(group)
        except JobDbUnavailable:  # nothing is lost: the worker tries the group again later
            LOG.error("group %s: job table unavailable; closing it later", group.key)
            return Refused("job_table_unavailable")
        except Exception as exc:
            LOG.exception("unexpected %s closing group %s; its unfinished instances are "
                          "quarantined", type(exc).__name__, group.key)
            for m in group.members:
                with contextlib.suppress(Exception):
                    row = self.jobs.get(m.name)
                    if row is not None and row.state == RECEIVED:
                        self.give_up(m.job, None, GatewayError("internal error", "internal"))
                    elif m.job.path.exists():
                        self.spool.remove(m.job.path)
            with contextlib.suppress(Exception):
                if group.persisted:
                    self.jobs.close_group(group.key, self.owner)
            return "closed"

    def _close(self, group: Group) -> Closing:
        if not self._holds(group):
            return self._lost(group)
        if not self._settle(group):
            return "stopping"  # ``recover`` takes it up again after a restart
        if not self._holds(group):  # taken over while inferring: never handed on twice
            return self._lost(group)
        completed = self.completed(group) if self.sink is not None else None
        if self.sink is not None and completed is not None and completed.results:
            try:
                self.sink.accept(completed)
            except Exception as exc:  # the sink says "later": retry, never drop
                self.metrics.group_sink_errors.labels(group.level).inc()
                return Refused(type(exc).__name__)
        if group.persisted and not self.jobs.close_group(group.key, self.owner) and self.owner:
            return self._lost(group)  # its files are the new holder's
        for m in group.members:
            self.spool.remove(m.job.path)
        for path in self.maps.glob(f"{group.key}-*.npy") if self.maps.is_dir() else ():
            path.unlink(missing_ok=True)
        for m in group.members:
            (self.maps / f"{m.name}.npy").unlink(missing_ok=True)
        self.metrics.groups_closed.labels(group.level, self._outcome(group)).inc()
        if group.persisted:
            LOG.info("group %s closed (%d instances)", group.key, len(group.members))
        return "closed"

    def _holds(self, group: Group) -> bool:
        """This worker still holds the group: its claim in the table (series and study
        groups), or its rows (an instance group: a take-over moves the row to another)."""
        if self.owner is None:
            return True
        if group.persisted:
            return self.jobs.holds(group.key, self.owner)
        rows = self.jobs.rows([m.name for m in group.members])
        return all(r.owner in (None, self.owner) for r in rows.values())

    def _lost(self, group: Group) -> Closing:
        LOG.warning("group %s was taken over by another worker (this worker's lease had"
                    " expired); left to it", group.key)
        return "lost"

    def _outcome(self, group: Group) -> str:
        states = {r.state for m in group.members if (r := self.jobs.get(m.name)) is not None}
        if states & {INFERRED, DELIVERED}:
            return "inferred"
        return "failed" if FAILED in states else "skipped"

    @staticmethod
    def series(group: Group) -> list[list[Member]]:
        """The group's members by series (first arrival first), each in slice order."""
        by_series: dict[str, list[Member]] = {}
        for m in group.members:
            by_series.setdefault(m.uid("SeriesInstanceUID"), []).append(m)
        return [[ms[i] for i in slice_order([m.ds for m in ms])] for ms in by_series.values()]

    def _settle(self, group: Group) -> bool:
        """Every member finished (inferred, failed or skipped); False only when stopping."""
        for series in self.series(group):
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

    def _skip(self, group: Group, series: list[Member], waiting: list[Member],
              reason: str) -> None:
        """A series the manifest's rules leave out: a ``skipped`` note in the results (not an
        error; per instance at level ``instance``, else per series) and its jobs finished as
        ``skipped`` with the rule as the reason."""
        first = series[0]
        doc: dict[str, Any] = {
            "model": self.core.manifest.name, "model_version": self.core.manifest.version,
            "study_instance_uid": first.uid("StudyInstanceUID"),
            "series_instance_uid": first.uid("SeriesInstanceUID"),
            "skipped": {"reason": reason, "instances": len(series),
                        "message": "the model's selection rules leave this series out"},
        }
        if group.level == "instance":
            doc["sop_instance_uid"] = first.uid("SOPInstanceUID")
            self.results.save(doc["study_instance_uid"], doc["sop_instance_uid"], doc,
                              job=first.name)
        else:
            self.results.save(doc["study_instance_uid"], doc["series_instance_uid"], doc,
                              job=group.key)
        self.jobs.finish_many([m.name for m in waiting], SKIPPED, reason, self.owner)
        for m in waiting:
            self.metrics.requests.labels(m.job.protocol, "skipped", reason).inc()
        LOG.info("series %s skipped: %s", uid_hash(first.uid("SeriesInstanceUID")), reason)

    def retrying(self, name: str, call: Callable[[], Result]) -> Result | None:
        """``call()`` until it is not Unavailable (capped exponential backoff from
        ``backoff_s``, each attempt counted on the job ``name``); None only when stopping.
        Other GatewayErrors propagate."""
        backoff = self.backoff_s
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
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        return None

    def _from_stored(self, doc: dict[str, Any] | None, tag: str, names: list[str]) -> bool:
        """Finish jobs whose result a previous run stored (crash before ``finish``)."""
        if doc is None or doc.get(ResultStore.JOB_KEY) != tag:
            return False
        error = doc.get("error")
        self.jobs.finish_many(names, FAILED if error else INFERRED,
                              error.get("reason") if isinstance(error, dict) else None,
                              self.owner)
        LOG.info("job %s: result already stored before a restart; not inferred again", tag)
        return True

    def _infer_instance(self, m: Member) -> bool:
        """One instance -> one result; False only when stopping."""
        job, name = m.job, m.name
        if self._from_stored(self.results.stored(hashed(m.uid("StudyInstanceUID")),
                                                 hashed(m.uid("SOPInstanceUID"))), name, [name]):
            return True
        if not m.full:
            try:
                m.ds, m.full = parse(job.path.read_bytes()), True
            except GatewayError as exc:
                self.give_up(job, None, exc, release=False)
                return True
        start = time.perf_counter()
        timings = dict(job.timings_ms)
        if job.acked is not None:
            timings["queue"] = (start - job.acked) * 1000.0
        try:
            result = self.retrying(name, lambda: self.core.analyze(m.ds, timings))
        except GatewayError as exc:
            self.give_up(job, m.ds, exc, release=False)
            return True
        if result is None:
            return False
        origin = job.arrival if job.arrival is not None else start
        complete_timings(result.timings_ms, origin, time.perf_counter())
        self._save_maps(name, result)
        self.results.save(result.study_instance_uid, result.sop_instance_uid,
                          result.to_dict(), job=name)
        self.jobs.finish(name, INFERRED, owner=self.owner)
        self.metrics.observe(self.core.manifest.name, job.protocol, result.timings_ms)
        self.metrics.requests.labels(job.protocol, "inferred", "ok").inc()
        return True

    def _infer_series(self, group: Group, series: list[Member], waiting: list[Member]) -> bool:
        """One series (slice order) -> one result, stored under the series' UID and naming
        the group; False only when stopping."""
        first = series[0]
        study_uid, series_uid = first.uid("StudyInstanceUID"), first.uid("SeriesInstanceUID")
        names = [m.name for m in waiting]
        if self._from_stored(self.results.stored(hashed(study_uid), hashed(series_uid)),
                             group.key, names):
            return True
        readable = []
        for m in series:
            try:
                if not m.full:
                    m.ds, m.full = parse(m.job.path.read_bytes()), True
                readable.append(m)
            except GatewayError as exc:
                if m in waiting:
                    self.give_up(m.job, None, exc, release=False)
                    names.remove(m.name)
        if not readable:
            return True
        middle = readable[len(readable) // 2]
        spec = self.core.manifest.input
        start = time.perf_counter()

        def infer() -> Result:
            if spec.depth is None:  # 2-D model: the middle slice stands for the series
                return self.core.analyze(middle.ds, {})
            t0 = time.perf_counter()
            slices = []
            for m in readable:
                self.core.check(m.ds)
                slices.append(_slice_input(m.ds, self.core))
            return self.core.analyze_input(middle.ds, series_volume(slices, spec.depth), {},
                                           t0)

        try:
            result = self.retrying(middle.name, infer)
        except GatewayError as exc:
            LOG.warning("series %s failed: %s", uid_hash(series_uid), exc.reason)
            self.results.save(study_uid, series_uid, {
                "model": self.core.manifest.name, "model_version": self.core.manifest.version,
                "study_instance_uid": study_uid, "series_instance_uid": series_uid,
                "inferred_on": "series",
                "error": {"reason": exc.reason, "message": str(exc)},
            }, job=group.key)
            self.jobs.finish_many(names, FAILED, exc.reason, self.owner)
            for m in waiting:
                self.metrics.requests.labels(m.job.protocol, "failed", exc.reason).inc()
            return True
        if result is None:
            return False
        complete_timings(result.timings_ms, start, time.perf_counter())
        self._save_maps(f"{group.key}-{hashed(series_uid)}", result)
        doc = {**result.to_dict(), "inferred_on": "series", "instances": len(readable),
               "source_sop_instance_uids": [m.uid("SOPInstanceUID") for m in readable]}
        self.results.save(study_uid, series_uid, doc, job=group.key)
        self.jobs.finish_many(names, INFERRED, owner=self.owner)
        self.metrics.observe(self.core.manifest.name, middle.job.protocol, result.timings_ms)
        for m in waiting:
            self.metrics.requests.labels(m.job.protocol, "inferred", "ok").inc()
        LOG.info("series %s inferred as one item (%d instances)", uid_hash(series_uid),
                 len(readable))
        return True

    def _save_maps(self, stem: str, result: Result) -> None:
        """Segmentation maps for the sink, durable before the result that they go with."""
        if result.maps is None or self.sink is None:
            return
        self.maps.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, result.maps)
        write_durably(self.maps / f"{stem}.npy", buffer.getbuffer())

    def completed(self, group: Group) -> CompletedGroup:
        """What the sink gets: stored results of the inferred items (errors included; skipped
        series are not results), their source files in slice order, maps, protocols, AEs."""
        results: list[dict[str, Any]] = []
        sources: list[Path] = []
        maps: list[Path] = []
        rows = {m.name: self.jobs.get(m.name) for m in group.members}
        first = group.members[0]
        study_uid = first.uid("StudyInstanceUID")
        series_uids = []
        for series in self.series(group):
            series_uid = series[0].uid("SeriesInstanceUID")
            series_uids.append(series_uid)
            doc = self.results.stored(hashed(study_uid), hashed(series_uid))
            if doc is not None and doc.get(ResultStore.JOB_KEY) == group.key:
                if "skipped" in doc:
                    continue
                results.append({k: v for k, v in doc.items() if k != ResultStore.JOB_KEY})
                sources.extend(m.job.path for m in series if m.job.path.exists())
                maps.append(self.maps / f"{group.key}-{hashed(series_uid)}.npy")
                continue
            for m in series:
                doc = self.results.stored(hashed(study_uid), hashed(m.uid("SOPInstanceUID")))
                if doc is None or doc.get(ResultStore.JOB_KEY) != m.name or "skipped" in doc:
                    continue
                results.append({k: v for k, v in doc.items() if k != ResultStore.JOB_KEY})
                sources.append(m.job.path)
                maps.append(self.maps / f"{m.name}.npy")
        protocols = {r.protocol for r in rows.values() if r is not None}
        aets = {r.calling_aet for r in rows.values() if r is not None and r.calling_aet}
        return CompletedGroup(
            key=group.key, level=group.level, study_uid=study_uid,
            model=self.core.manifest.name,
            series_uids=tuple(series_uids), job_names=tuple(m.name for m in group.members),
            sources=tuple(sources), results=tuple(results),
            maps=tuple(p for p in maps if p.exists()),
            protocols=tuple(sorted(protocols)), calling_aets=tuple(sorted(aets)),
        )

    def give_up(self, job: Job, ds: Dataset | None, exc: GatewayError,
                release: bool = True) -> None:
        """Store an error result when the instance is identifiable; else quarantine the file.
        ``release`` False: the group's close removes the spool file, not this."""
        LOG.warning("spooled instance %s failed: %s", job.path.name, exc.reason)
        name = job.path.name
        study = str(ds.get("StudyInstanceUID", "")) if ds is not None else ""
        sop = str(ds.get("SOPInstanceUID", "")) if ds is not None else ""
        self.jobs.insert(name, study, "", sop, job.protocol)  # no-op when the row exists
        if study and sop:
            self.results.save(study, sop, {
                "model": self.core.manifest.name, "model_version": self.core.manifest.version,
                "study_instance_uid": study, "sop_instance_uid": sop,
                "error": {"reason": exc.reason, "message": str(exc)},
            }, job=name)
            LOG.info("stored error result for instance %s", uid_hash(sop))
            self.jobs.finish(name, FAILED, exc.reason, self.owner)
            if release:
                self.spool.remove(job.path)
        elif job.path.exists():
            self.jobs.finish(name, FAILED, exc.reason, self.owner)
            self.spool.quarantine(job.path)
        self.metrics.requests.labels(job.protocol, "failed", exc.reason).inc()


def _slice_input(ds: Dataset, core: InferenceCore) -> np.ndarray:
    """One slice of a series for a 3-D model (``optimizer.contract.series``), (1, C, H, W)."""
    try:
        return slice_input(ds, core.manifest.input, header_checked=True)
    except PreprocessError as exc:
        raise InvalidInstance(str(exc), "bad_pixels") from exc
