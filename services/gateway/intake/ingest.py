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
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from services.gateway.dicom.parsing import parse
from services.gateway.errors import PayloadTooLarge, Unavailable
from services.gateway.inference.core import InferenceCore
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
                 min_free_bytes: int = 0, returns: ReturnSink | None = None) -> None:
        self.core = core
        self._spool = spool
        self._worker = worker
        self._metrics = metrics
        self._max_depth = max_spool_depth
        self._max_bytes = max_instance_bytes
        self._min_free = min_free_bytes
        self._returns = returns

    def check_capacity(self) -> None:
        """Back-pressure: refuse new work while too much acknowledged work is unfinished, or
        while the spool's filesystem is below its free-space watermark (checked before any
        byte is written, so a full disk never turns into a half-written, acknowledged file)."""
        if self._worker.depth >= self._max_depth:
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
        self.core.check(ds)
        return data, ds

    def take_returning(self, ds: Dataset, protocol: str, calling_aet: str | None = None) -> bool:
        """True when ``ds`` is an object coming back about a de-identified study and is now
        durably queued, re-identified, for delivery: the edge acknowledges it and does no
        more. False: handle it as any other instance (``core.check``, then ``accept``)."""
        if self._returns is None or not self._returns.take_returning(ds, protocol, calling_aet):
            return False
        self._metrics.requests.labels(protocol, "returned", "ok").inc()
        LOG.info("instance %s came back about a de-identified study: re-identified, queued "
                 "(via %s)", uid_hash(str(ds.get("SOPInstanceUID", ""))), protocol)
        return True

    def accept(self, data: bytes, ds: Dataset, protocol: str, arrival: float,
               received: float, calling_aet: str | None = None) -> Path:
        """Spool durably, then queue for inference. Raises Unavailable when it cannot spool:
        the caller must not acknowledge in that case. ``calling_aet``: the DIMSE calling AE
        title (kept in the job table for the group and its delivery); None for HTTP edges."""
        self.check_capacity()
        try:
            path = self._spool.put(data)
        except OSError as exc:
            LOG.error("spool write failed: %s", exc.strerror)
            raise Unavailable("cannot spool the instance", "spool_error") from exc
        try:
            self._worker.jobs.insert(path.name, str(ds.get("StudyInstanceUID", "")),
                                     str(ds.get("SeriesInstanceUID", "")),
                                     str(ds.get("SOPInstanceUID", "")), protocol,
                                     calling_aet)
        except Exception as exc:  # sqlite3.Error, OSError: not acknowledged, so take it back
            LOG.error("job table insert failed: %s", type(exc).__name__)
            # if even that fails, start-up reconciliation processes the file once
            with contextlib.suppress(OSError):
                self._spool.remove(path)
            raise Unavailable("cannot record the instance", "spool_error") from exc
        acked = time.perf_counter()
        self._worker.submit(Job(
            path=path, protocol=protocol, arrival=arrival, acked=acked,
            timings_ms={"receive": (received - arrival) * 1000.0,
                        "spool": (acked - received) * 1000.0},
            calling_aet=calling_aet,
        ))
        self._metrics.requests.labels(protocol, "accepted", "ok").inc()
        LOG.info("spooled instance %s via %s", uid_hash(str(ds.SOPInstanceUID)), protocol)
        return path

    def pending(self, study_uid: str) -> int:
        """Instances of the study acknowledged and not finished yet (job table rows still
        ``received``). The worker stores a result before it finishes the row, so an instance
        is always pending, or has a result, or briefly both: never neither."""
        return self._worker.jobs.pending(study_uid)
