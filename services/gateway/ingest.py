"""Durable acceptance of instances, shared by every edge that acknowledges before inferring
(DIMSE C-STORE, DICOMweb STOW-RS, the JSON study API).

An edge calls ``check`` (capacity, size, header checks), then ``accept``: the bytes are
spooled with ``Spool.put`` (fsynced) and only then queued for the worker, so whatever the edge
acknowledges afterwards survives a crash. ``pending`` answers "is this study still being
processed?" from the spool itself, so it stays right across restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from services.gateway.core import InferenceCore, parse, uid_hash
from services.gateway.errors import PayloadTooLarge, Unavailable
from services.gateway.metrics import GatewayMetrics
from services.gateway.spool import Spool
from services.gateway.worker import Job, SpoolWorker

LOG = logging.getLogger(__name__)


def with_preamble(data: bytes) -> bytes:
    """A Part-10 file whose preamble was left out (it starts right at the File Meta group, as
    ``pydicom.dcmwrite`` writes by default and dicomweb-client sends) gets the standard empty
    preamble and "DICM" prefix; nothing else about it changes. Other bytes pass unchanged."""
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00":
        return b"\x00" * 128 + b"DICM" + data
    return data


class Ingestor:
    def __init__(self, core: InferenceCore, spool: Spool, worker: SpoolWorker,
                 metrics: GatewayMetrics, max_spool_depth: int, max_instance_bytes: int) -> None:
        self.core = core
        self._spool = spool
        self._worker = worker
        self._metrics = metrics
        self._max_depth = max_spool_depth
        self._max_bytes = max_instance_bytes
        self._study_of: dict[str, str] = {}  # spooled file name -> Study Instance UID
        self._lock = threading.Lock()

    def check_capacity(self) -> None:
        """Back-pressure: refuse new work while too much acknowledged work is unfinished."""
        if self._worker.depth >= self._max_depth:
            raise Unavailable("too many instances waiting for inference; retry later",
                              "spool_full")

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

    def accept(self, data: bytes, ds: Dataset, protocol: str, arrival: float,
               received: float) -> Path:
        """Spool durably, then queue for inference. Raises Unavailable when it cannot spool:
        the caller must not acknowledge in that case."""
        self.check_capacity()
        try:
            path = self._spool.put(data)
        except OSError as exc:
            LOG.error("spool write failed: %s", exc.strerror)
            raise Unavailable("cannot spool the instance", "spool_error") from exc
        acked = time.perf_counter()
        with self._lock:
            self._study_of[path.name] = str(ds.StudyInstanceUID)
        self._worker.submit(Job(
            path=path, protocol=protocol, arrival=arrival, acked=acked,
            timings_ms={"receive": (received - arrival) * 1000.0,
                        "spool": (acked - received) * 1000.0},
        ))
        self._metrics.requests.labels(protocol, "accepted", "ok").inc()
        LOG.info("spooled instance %s via %s", uid_hash(str(ds.SOPInstanceUID)), protocol)
        return path

    def pending(self, study_uid: str) -> int:
        """Instances of the study acknowledged and not finished yet (still in the spool).

        The worker stores a result before it removes the spool file, so an instance is always
        in the spool, in the result store, or briefly in both: never in neither."""
        names = {p.name: p for p in self._spool.pending()}
        with self._lock:
            for gone in set(self._study_of) - set(names):
                del self._study_of[gone]
            unknown = [p for name, p in names.items() if name not in self._study_of]
        for path in unknown:  # left from before a restart: read just the header once
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True,
                                         specific_tags=["StudyInstanceUID"])
                study = str(header.get("StudyInstanceUID", ""))
            except FileNotFoundError:
                continue  # finished meanwhile
            except Exception:  # a damaged file the worker will quarantine
                study = ""
            with self._lock:
                self._study_of[path.name] = study
        with self._lock:
            return sum(1 for name in names if self._study_of.get(name) == study_uid)
