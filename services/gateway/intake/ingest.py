"""Durable acceptance of instances, shared by every edge that acknowledges before inferring
(DIMSE C-STORE, DICOMweb STOW-RS, the JSON study API).

An edge calls ``check`` (capacity, free disk, size, header checks), then ``accept``: the bytes
are spooled with ``Spool.put`` (fsynced), a ``received`` row is committed to the job table, and
only then is the instance queued for the worker, so whatever the edge acknowledges afterwards
survives a crash (see store/jobs.py for the crash-consistency argument). ``pending`` answers
"is this study still being processed?" from the job table, so it stays right across restarts.

The return path: before an edge checks an instance for the model, it offers it to
``take_returning``. A ``ReturnSink`` (the delivery side, wired by the composition root) takes an
object that comes back about a study a route de-identified (an external reader's SR, a vendor's
SEG), durably queues its re-identified copy, and says so; such an object is acknowledged without
inference, whatever its SOP class. Anything else (and everything, without a sink) goes the usual
way, where non-image objects are still refused.

A gateway serving several models has one ``ModelLane`` per model (its own spool folder, job
table, results and worker; ``models.py``). ``check`` says which lanes take an instance (the
model's header checks and its routing rules); ``accept`` spools it into each of them, so every
model gets its own job with its own grouping level and result type. An instance no model takes
is refused with the reasons of each.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from optimizer.contract.series import not_admitted
from services.gateway.dicom.parsing import parse
from services.gateway.errors import GatewayError, PayloadTooLarge, Unavailable, UnsupportedInstance
from services.gateway.inference.core import InferenceCore
from services.gateway.intake.models import ModelLane
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import uid_hash
from services.gateway.processing.worker import Job, SpoolWorker
from services.gateway.store.spool import Spool

LOG = logging.getLogger(__name__)


def with_preamble(data: bytes) -> bytes:
    """A Part-10 file whose preamble was left out (it starts right at the File Meta group, as
    ``pydicom.dcmwrite`` writes by default and dicomweb-client sends) gets the standard empty
    preamble and "DICM" prefix; nothing else about it changes. Other bytes pass unchanged."""
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00":
        return b"\x00" * 128 + b"DICM" + data
    return data


class ReturnSink(Protocol):
    def take_returning(self, ds: Dataset, protocol: str, calling_aet: str | None) -> bool:
        """True when ``ds`` came back about a de-identified study and is durably queued;
        raises GatewayError when it did but cannot be taken."""
        ...


class Ingestor:
    def __init__(self, core: InferenceCore, spool: Spool, worker: SpoolWorker,
                 metrics: GatewayMetrics, max_spool_depth: int, max_instance_bytes: int,
                 min_free_bytes: int = 0, returns: ReturnSink | None = None,
                 lanes: Sequence[ModelLane] = ()) -> None:
        """``core``/``spool``/``worker``: the default model's; ``lanes``: every model served
        (the default model's lane first); empty: the default model alone."""
        self.core = core
        self._spool = spool
        self._worker = worker
        self.lanes: tuple[ModelLane, ...] = tuple(lanes) or (
            ModelLane(core.manifest.name, core, spool, worker.runner.results, worker),)
        self._metrics = metrics
        self._max_depth = max_spool_depth
        self._max_bytes = max_instance_bytes
        self._min_free = min_free_bytes
        self._returns = returns

    def check_capacity(self) -> None:
        """Back-pressure: refuse new work while too much acknowledged work is unfinished, or
        while the spool's filesystem is below its free-space watermark (checked before any
        byte is written, so a full disk never turns into a half-written, acknowledged file)."""
        if any(lane.worker.depth >= self._max_depth for lane in self.lanes):
            raise Unavailable("too many instances waiting for inference; retry later",
                              "spool_full")
        if self._min_free and shutil.disk_usage(self._spool.root).free < self._min_free:
            LOG.error("spool filesystem below %d free bytes: refusing new work",
                      self._min_free)
            raise Unavailable("gateway storage is nearly full; retry later", "disk_full")

    def check_size(self, size: int) -> None:
        if size > self._max_bytes:
            raise PayloadTooLarge(f"instance of {size} bytes exceeds {self._max_bytes}",
                                  "too_large")

    def read(self, data: bytes) -> tuple[bytes, Dataset]:
        """Part-10 bytes -> (bytes to spool, dataset); raises GatewayError. See
        ``with_preamble`` for the one repair made."""
        self.check_size(len(data))
        data = with_preamble(data)
        return data, parse(data)

    def parse_and_check(self, data: bytes) -> tuple[bytes, Dataset]:
        """``read``, then the header checks."""
        data, ds = self.read(data)
        self.check(ds)
        return data, ds

    def take_returning(self, ds: Dataset, protocol: str, calling_aet: str | None = None) -> bool:
        """True when ``ds`` is an object coming back about a de-identified study and is now
        durably queued, re-identified, for delivery: the edge acknowledges it and does no
        more. False: handle it as any other instance (``check``, then ``accept``)."""
        if self._returns is None or not self._returns.take_returning(ds, protocol, calling_aet):
            return False
        self._metrics.requests.labels(protocol, "returned", "ok").inc()
        LOG.info("instance %s came back about a de-identified study: re-identified, queued "
                 "(via %s)", uid_hash(str(ds.get("SOPInstanceUID", ""))), protocol)
        return True

    def check(self, ds: Dataset, calling_aet: str | None = None) -> tuple[ModelLane, ...]:
        """The lanes (models) that take ``ds``: its header checks pass and its routing rules
        accept it. None does: the error of the only model, or, with several, an
        ``UnsupportedInstance`` (the first model's reason) listing each model's reason."""
        if len(self.lanes) == 1:
            lane = self.lanes[0]
            lane.core.check(ds)
            reason = not_admitted(lane.manifest.selection, ds, calling_aet)
            if reason is not None:
                raise UnsupportedInstance(f"model {lane.name}'s selection rules leave this "
                                          "instance out", reason)
            return self.lanes
        taken: list[ModelLane] = []
        refusals: list[tuple[str, GatewayError]] = []
        for lane in self.lanes:
            try:
                lane.core.check(ds)
            except GatewayError as exc:
                refusals.append((lane.name, exc))
                continue
            reason = not_admitted(lane.manifest.selection, ds, calling_aet)
            if reason is not None:
                refusals.append((lane.name, UnsupportedInstance(
                    "its selection rules leave this instance out", reason)))
                continue
            taken.append(lane)
        if taken:
            return tuple(taken)
        first = refusals[0][1]
        text = "; ".join(f"{name}: {exc}" for name, exc in refusals)
        raise type(first)(f"no model served here takes this instance ({text})", first.reason)

    def accept(self, data: bytes, ds: Dataset, protocol: str, arrival: float,
               received: float, calling_aet: str | None = None,
               lanes: Sequence[ModelLane] | None = None) -> Path:
        """Spool durably, then queue for inference, once per lane (model) that takes it
        (``lanes``, from ``check``; None: checked here). Raises Unavailable when it cannot
        spool: the caller must not acknowledge in that case. All or nothing across lanes: the
        file is spooled and its job row inserted in every lane first, and only then is any
        lane's worker given the job; when a lane fails, the lanes staged before it get their
        file and row taken back, so a refused (and then resent) instance is inferred once per
        model, not twice. ``calling_aet``: the DIMSE calling AE title (kept in the job table
        for the group and its delivery); None for HTTP edges. Returns the first lane's spool
        file."""
        self.check_capacity()
        if lanes is None:
            lanes = self.lanes if len(self.lanes) == 1 else self.check(ds, calling_aet)
        staged: list[tuple[ModelLane, Path, bool]] = []
        try:
            for lane in lanes:
                staged.append(self._stage(lane, data, ds, protocol, calling_aet))
        except BaseException:
            for lane, path, recorded in staged:
                self._withdraw(lane, path, recorded)
            raise
        acked = time.perf_counter()
        for lane, path, recorded in staged:
            if not recorded:  # the insert waited so long that another worker recovered it
                LOG.warning("spooled instance %s was taken up by another gateway worker",
                            path.name)  # durable all the same: acknowledged, processed there
                continue
            lane.worker.submit(Job(
                path=path, protocol=protocol, arrival=arrival, acked=acked,
                timings_ms={"receive": (received - arrival) * 1000.0,
                            "spool": (acked - received) * 1000.0},
                calling_aet=calling_aet,
            ))
        self._metrics.requests.labels(protocol, "accepted", "ok").inc()
        LOG.info("spooled instance %s via %s for %d model(s)", uid_hash(str(ds.SOPInstanceUID)),
                 protocol, len(staged))
        return staged[0][1]

    def _stage(self, lane: ModelLane, data: bytes, ds: Dataset, protocol: str,
               calling_aet: str | None) -> tuple[ModelLane, Path, bool]:
        """The file spooled and its ``received`` row inserted in ``lane``, not yet given to
        the lane's worker: (lane, file, whether this call inserted the row)."""
        try:
            path = lane.spool.put(data)
        except OSError as exc:
            LOG.error("spool write failed: %s", exc.strerror)
            raise Unavailable("cannot spool the instance", "spool_error") from exc
        try:
            recorded = lane.worker.jobs.insert(path.name, str(ds.get("StudyInstanceUID", "")),
                                               str(ds.get("SeriesInstanceUID", "")),
                                               str(ds.get("SOPInstanceUID", "")), protocol,
                                               calling_aet, owner=lane.worker.owner)
        except Exception as exc:  # sqlite3.Error, OSError: not acknowledged, so take it back
            LOG.error("job table insert failed: %s", type(exc).__name__)
            # if even that fails, start-up reconciliation processes the file once
            with contextlib.suppress(OSError):
                lane.spool.remove(path)
            raise Unavailable("cannot record the instance", "spool_error") from exc
        return lane, path, recorded

    @staticmethod
    def _withdraw(lane: ModelLane, path: Path, recorded: bool) -> None:
        """Take back a staged lane of an instance that is not acknowledged: its file, then its
        row. A row another worker recovered (``recorded`` False) is that worker's now; a row
        that cannot be deleted here stays ``received`` without a file, which recovery ends."""
        if not recorded:
            return
        with contextlib.suppress(OSError):
            lane.spool.remove(path)
        try:
            lane.worker.jobs.withdraw(path.name)
        except Exception as exc:  # sqlite3.Error, OSError: logged, the refusal stands
            LOG.error("job table withdraw failed: %s", type(exc).__name__)

    def pending(self, study_uid: str) -> int:
        """Instances of the study acknowledged and not finished yet (job table rows still
        ``received``). The worker stores a result before it finishes the row, so an instance
        is always pending, or has a result, or briefly both: never neither."""
        return sum(lane.worker.jobs.pending(study_uid) for lane in self.lanes)
