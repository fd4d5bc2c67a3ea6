"""DIMSE edge: C-ECHO and C-STORE SCP (pynetdicom).

A C-STORE success is returned only once the instance is durably spooled; inference happens
afterwards, in the worker. Gateway errors map to DIMSE statuses in one table.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from services.errors import ServiceError
from services.gateway.config import GatewayConfig
from services.gateway.core import InferenceCore, read_leniently, uid_hash
from services.gateway.errors import (
    GatewayError,
    InferenceFailed,
    InvalidInstance,
    MissingPixelData,
    PayloadTooLarge,
    Unavailable,
    UnsupportedInstance,
    UnsupportedSOPClass,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.spool import Spool
from services.gateway.worker import Job, SpoolWorker

LOG = logging.getLogger(__name__)
VERIFICATION = "1.2.840.10008.1.1"
SUCCESS = 0x0000

# Gateway error -> DIMSE C-STORE status (PS3.4 Annex B.2.3); the most specific class wins.
STATUS: tuple[tuple[type[GatewayError], int], ...] = (
    (UnsupportedSOPClass, 0x0122),  # Refused: SOP Class not supported
    (MissingPixelData, 0xA900),  # Error: Data Set does not match SOP Class
    (UnsupportedInstance, 0xC000),  # Error: Cannot understand (not for this model)
    (InvalidInstance, 0xC000),  # Error: Cannot understand
    (InferenceFailed, 0xC000),
    (PayloadTooLarge, 0xA700),  # Refused: Out of resources
    (Unavailable, 0xA700),  # Refused: Out of resources
    (GatewayError, 0xC000),
)


def status_for(exc: GatewayError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 0xC000


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


class DicomServer:
    def __init__(self, config: GatewayConfig, core: InferenceCore, spool: Spool,
                 worker: SpoolWorker, metrics: GatewayMetrics) -> None:
        self._config = config
        self._core = core
        self._spool = spool
        self._worker = worker
        self._metrics = metrics
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        # pynetdicom's INFO/DEBUG output dumps DIMSE messages, UIDs included: never below WARNING.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        read_leniently()
        ae = AE(ae_title=self._config.ae_title)
        ae.maximum_associations = self._config.max_associations
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(VERIFICATION)  # not in the storage list; needed for C-ECHO
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        try:
            self._server = ae.start_server(
                (self._config.dicom_host, self._config.dicom_port), block=False,
                evt_handlers=handlers,
            )
        except OSError as exc:
            raise ServiceError(f"cannot listen for DICOM on {self._config.dicom_host}:"
                               f"{self._config.dicom_port}: {exc.strerror}") from exc
        LOG.info("DIMSE SCP %s listening on %s:%d", self._config.ae_title,
                 self._config.dicom_host, self._config.dicom_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    def _on_open(self, event: Event) -> None:
        self._metrics.open_associations.inc()

    def _on_close(self, event: Event) -> None:
        self._metrics.open_associations.dec()

    def _on_echo(self, event: Event) -> int:
        self._metrics.requests.labels("dimse", "echo", "ok").inc()
        return SUCCESS

    def _on_store(self, event: Event) -> Dataset:
        arrival = time.perf_counter()
        if self._worker.depth >= self._config.max_spool_depth:
            return self._refuse(Unavailable(
                "too many instances waiting for inference; retry later", "spool_full"))
        encoded = getattr(event.request, "DataSet", None)  # C-STORE-RQ: BytesIO of the data set
        size = encoded.getbuffer().nbytes if encoded is not None else 0
        if size > self._config.max_request_bytes:
            return self._refuse(PayloadTooLarge(
                f"data set of {size} bytes exceeds {self._config.max_request_bytes}",
                "too_large"))
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:  # pynetdicom decodes lazily; any decode error lands here
            return self._refuse(InvalidInstance(f"cannot decode data set: {exc}", "unreadable"))
        try:
            self._core.check(ds)
        except GatewayError as exc:
            return self._refuse(exc)
        received = time.perf_counter()
        try:
            path = self._spool.put(event.encoded_dataset())
        except OSError as exc:
            LOG.error("spool write failed: %s", exc.strerror)
            return self._refuse(Unavailable("cannot spool the instance", "spool_error"))
        acked = time.perf_counter()
        self._worker.submit(Job(
            path=path, protocol="dimse", arrival=arrival, acked=acked,
            timings_ms={"receive": (received - arrival) * 1000.0,
                        "spool": (acked - received) * 1000.0},
        ))
        self._metrics.requests.labels("dimse", "accepted", "ok").inc()
        LOG.info("spooled instance %s (association %s)", uid_hash(str(ds.SOPInstanceUID)),
                 event.assoc.name)
        return _status(SUCCESS)

    def _refuse(self, exc: GatewayError) -> Dataset:
        code = status_for(exc)
        LOG.warning("C-STORE refused with 0x%04X: %s", code, exc.reason)
        self._metrics.requests.labels("dimse", "refused", exc.reason).inc()
        return _status(code, str(exc))
