"""DIMSE edge: C-ECHO and C-STORE SCP (pynetdicom), optionally over DICOM TLS.

A C-STORE success is returned only once the instance is durably spooled; inference happens
afterwards, in the worker. DIMSE statuses come from ``services.gateway.status``. Associations
from calling AE titles outside the configured allowlist are rejected (A-ASSOCIATE-RJ,
"calling AE title not recognized"). One calling AE title may hold at most
``max_associations_per_ae`` associations at once (beyond: A-ASSOCIATE-RJ, transient, "local limit
exceeded"), so one peer cannot take every slot; an association that lasts longer than
``association_lifetime_s`` is aborted (A-ABORT), however busy. Every rejection, every lifetime
abort and every refused store is logged with its reason, counted and audited, never with patient
data.

In a pod of several gateway processes (``pod`` given) both association limits are the pod's:
every process listens on the same port (SO_REUSEPORT) and counts its associations in the pod's
shared state (``security.podstate``), so ``max_associations`` and ``max_associations_per_ae``
hold however the kernel spreads the connections.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from optimizer.contract.preprocess import SUPPORTED_TRANSFER_SYNTAXES
from services.errors import ServiceError
from services.gateway.config import GatewayConfig
from services.gateway.dicom.parsing import (
    check_inflated,
    client_text,
    part10_bytes,
    read_leniently,
    shown_uid,
)
from services.gateway.dicom.sop_classes import storage_sop_classes
from services.gateway.errors import (
    GatewayError,
    InvalidInstance,
    PayloadTooLarge,
    SOPClassMismatch,
)
from services.gateway.intake.ingest import Ingestor
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import quiet_identifier_quoting_loggers, uid_hash
from services.gateway.security.audit import AuditContext, AuditLog
from services.gateway.security.podstate import PodState
from services.gateway.security.tls import CertFiles, ReloadingSSLContext, subject_of
from services.gateway.status import dimse_status

LOG = logging.getLogger(__name__)
VERIFICATION = "1.2.840.10008.1.1"
SUCCESS = 0x0000
# A-ASSOCIATE-RJ result, source and diagnostic (PS3.8 9.3.4): rejected-transient, by the DUL
# service provider (presentation related), local limit exceeded.
_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
_POD_TOTAL = "total"  # the pod's key for all associations; a calling AE's is "ae:" + title


class _ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with SO_REUSEPORT: the pod's processes listen on
    one port and the kernel spreads new associations over them."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()  # pynetdicom's own: SO_REUSEADDR, timeout, bind

def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


def _printable(aet: str) -> str:
    """A peer-chosen AE title made safe for a log line (no control characters)."""
    return ascii(aet.strip())[1:-1][:32]


def _client_subject(assoc: Association) -> str | None:
    """The verified client certificate's subject on a DICOM TLS association, else None."""
    assoc_socket = getattr(assoc.dul, "socket", None)
    raw = getattr(assoc_socket, "socket", None)
    getpeercert = getattr(raw, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        return subject_of(getpeercert())
    except (OSError, ValueError):
        return None


def _spooled_bytes(event: Event) -> bytes:
    """The received data set as a Part-10 file, as received (no decode and re-encode): the
    same bytes as pynetdicom's ``event.encoded_dataset()``, encoded without its pydicom writer
    (``part10_bytes``), which falls back to it for a UID that is not plain digits and dots."""
    request = cast(C_STORE, event.request)
    # the view is released before pynetdicom reuses the buffer
    with cast(BytesIO, request.DataSet).getbuffer() as received:
        data = part10_bytes(received, str(request.AffectedSOPClassUID),
                            str(request.AffectedSOPInstanceUID),
                            str(event.context.transfer_syntax),
                            PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
    return data if data is not None else event.encoded_dataset()


class DicomServer:
    def __init__(self, config: GatewayConfig, ingestor: Ingestor,
                 metrics: GatewayMetrics, audit: AuditLog | None = None,
                 pod: PodState | None = None) -> None:
        """``audit``: where association and instance records go (none: not audited);
        ``pod``: the pod's shared limits (several gateway processes on one port)."""
        self._config = config
        self._pod = pod
        self._pod_holds: dict[Association, list[str]] = {}  # under _assoc_lock
        self._ingestor = ingestor
        self._metrics = metrics
        self._audit = audit
        self._server: ThreadedAssociationServer | None = None
        # Keyed by the Association itself: pynetdicom names acceptors by the second they began,
        # so two associations can share a name.
        self._assoc_bytes: dict[Association, int] = {}  # data-set bytes so far
        self._assoc_lock = threading.Lock()
        # Under _assoc_lock: calling AE title -> associations it holds (counted from the
        # request); association -> its calling AE title (counted ones only), its lifetime timer.
        self._per_ae: dict[str, int] = {}
        self._assoc_ae: dict[Association, str] = {}
        self._lifetimes: dict[Association, threading.Timer] = {}
        # Built at construction (fails early); re-read when the certificate files change.
        self._tls = (ReloadingSSLContext(
            CertFiles(config.tls_cert, config.tls_key, config.tls_ca),
            "required" if config.tls_ca is not None else "none").context
            if config.dicom_tls_context() is not None and config.tls_cert is not None
            and config.tls_key is not None else None)

    def start(self) -> None:
        # pynetdicom's INFO/DEBUG output dumps DIMSE messages, UIDs included: never below WARNING
        # (also when the server runs without the gateway around it).
        quiet_identifier_quoting_loggers()
        read_leniently()
        ae = AE(ae_title=self._config.ae_title)
        ae.maximum_associations = self._config.max_associations
        ae.maximum_pdu_size = self._config.max_pdu_bytes
        ae.require_calling_aet = list(self._config.allowed_calling_aets)
        # Every storage SOP class pynetdicom knows (a non-image one is refused per instance
        # with 0x0122, which tells the sender more than a rejected context; an image the model
        # does not take with 0xC001), in every transfer syntax the pixel decoders handle;
        # other syntaxes (MPEG, HEVC, JPEG 2000 Part 2...) are rejected at association, so the
        # sender can fall back to one of these.
        for sop_class in storage_sop_classes():
            ae.add_supported_context(sop_class, list(SUPPORTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION)  # not in the storage list; needed for C-ECHO
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        address = (self._config.dicom_host, self._config.dicom_port)
        try:
            if self._pod is None:
                self._server = ae.start_server(address, block=False, evt_handlers=handlers,
                                               ssl_context=self._tls)
            else:  # AE.start_server(block=False), with a server class that shares the port
                server = ae.make_server(address, evt_handlers=handlers,
                                        ssl_context=self._tls, server_class=_ReusePortServer)
                threading.Thread(target=server.serve_forever, name="dimse-acceptor",
                                 daemon=True).start()
                ae._servers.append(server)
                self._server = server
        except OSError as exc:
            raise ServiceError(f"cannot listen for DICOM on {self._config.dicom_host}:"
                               f"{self._config.dicom_port}: {exc.strerror}") from exc
        LOG.info("DIMSE SCP %s listening on %s:%d (%s, max PDU %d, %s)", self._config.ae_title,
                 self._config.dicom_host, self._config.dicom_port,
                 "DICOM TLS" if self._tls is not None else "no TLS",
                 self._config.max_pdu_bytes,
                 f"{len(self._config.allowed_calling_aets)} allowed calling AE titles"
                 if self._config.allowed_calling_aets else "any calling AE title")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self._assoc_lock:
            timers, self._lifetimes = list(self._lifetimes.values()), {}
        for timer in timers:
            timer.cancel()

    @property
    def listening(self) -> bool:
        return self._server is not None

    def _on_open(self, event: Event) -> None:
        self._metrics.open_associations.inc()

    def _on_close(self, event: Event) -> None:
        self._metrics.open_associations.dec()
        assoc = event.assoc
        with self._assoc_lock:
            self._assoc_bytes.pop(assoc, None)
            timer = self._lifetimes.pop(assoc, None)
            calling = self._assoc_ae.pop(assoc, None)
            pod_keys = self._pod_holds.pop(assoc, [])
            if calling is not None:
                left = self._per_ae.get(calling, 1) - 1
                if left > 0:
                    self._per_ae[calling] = left
                else:
                    self._per_ae.pop(calling, None)
        if timer is not None:
            timer.cancel()
        if self._pod is not None:
            for key in pod_keys:
                self._pod.release(key)

    def _on_requested(self, event: Event) -> None:
        """Count the association against its calling AE title, or reject it past the limit."""
        limit = self._config.max_associations_per_ae
        if not limit and self._pod is None:
            return
        calling = str(getattr(event.assoc.requestor.primitive, "calling_ae_title", "")).strip()
        allowed = self._config.allowed_calling_aets
        if allowed and calling not in allowed:
            return  # pynetdicom rejects it (calling AE title not recognized), uncounted
        if self._pod is not None:
            self._hold_in_pod(event, calling, limit)
            return
        with self._assoc_lock:
            held = self._per_ae.get(calling, 0)
            if held < limit:
                self._per_ae[calling] = held + 1
                self._assoc_ae[event.assoc] = calling
                return
        self._reject_over_limit(event, calling, "calling_ae_association_limit", held, limit)

    def _hold_in_pod(self, event: Event, calling: str, per_ae: int) -> None:
        """The pod-wide counts: one of ``max_associations`` for the pod, then one of
        ``max_associations_per_ae`` for the calling AE title; over either, rejected."""
        assert self._pod is not None
        keys: list[str] = []
        checks = [(_POD_TOTAL, self._config.max_associations, "association_limit")]
        if per_ae:
            checks.append(("ae:" + calling, per_ae, "calling_ae_association_limit"))
        for key, limit, reason in checks:
            held = self._pod.hold(key, limit)
            if held is not None:
                for taken in keys:
                    self._pod.release(taken)
                self._reject_over_limit(event, calling, reason, held, limit)
                return
            keys.append(key)
        with self._assoc_lock:
            self._pod_holds[event.assoc] = keys

    def _reject_over_limit(self, event: Event, calling: str, reason: str, held: int,
                           limit: int) -> None:
        LOG.warning("association from calling AE %r at %s rejected: %s (%d of %d held)",
                    _printable(calling), event.assoc.requestor.address, reason, held, limit)
        self._metrics.requests.labels("dimse", "rejected", reason).inc()
        self._record("association", "associate", reason, event.assoc, reason=reason,
                     status="A-ASSOCIATE-RJ", calling=calling)
        event.assoc.acse.send_reject(*_REJECT_LOCAL_LIMIT)
        event.assoc.kill()  # as pynetdicom does after its own rejections

    def _expire(self, assoc: Association) -> None:
        """Abort an association that outlived ``association_lifetime_s``."""
        with self._assoc_lock:
            if self._lifetimes.pop(assoc, None) is None:
                return  # closed meanwhile
        if not assoc.is_established:
            return
        reason = "association_lifetime"
        LOG.warning("association %s from calling AE %r at %s aborted: %s (%g s)", assoc.name,
                    _printable(str(assoc.requestor.ae_title)), assoc.requestor.address, reason,
                    self._config.association_lifetime_s)
        self._metrics.requests.labels("dimse", "aborted", reason).inc()
        self._record("association", "abort", reason, assoc, reason=reason, status="A-ABORT")
        assoc.abort()

    def _count_association_bytes(self, event: Event, size: int) -> None:
        limit = self._config.max_association_bytes
        if not limit:
            return
        with self._assoc_lock:
            total = self._assoc_bytes.get(event.assoc, 0) + size
            self._assoc_bytes[event.assoc] = total
        if total > limit:
            raise PayloadTooLarge(f"association exceeded {limit} bytes; open a new one",
                                  "association_too_large")

    def _on_rejected(self, event: Event) -> None:
        calling = str(event.assoc.requestor.ae_title)
        allowed = self._config.allowed_calling_aets
        if allowed and calling.strip() not in allowed:
            reason = "calling_ae_not_allowed"
        elif len(event.assoc.ae.active_associations) > self._config.max_associations:
            reason = "association_limit"
        else:
            reason = "negotiation"
        LOG.warning("association from calling AE %r at %s rejected: %s", _printable(calling),
                    event.assoc.requestor.address, reason)
        self._metrics.requests.labels("dimse", "rejected", reason).inc()
        self._record("association", "associate", reason, event.assoc, reason=reason,
                     status="A-ASSOCIATE-RJ")

    def _on_accepted(self, event: Event) -> None:
        self._record("association", "associate", "ok", event.assoc, status="A-ASSOCIATE-AC")
        lifetime = self._config.association_lifetime_s
        if lifetime:
            timer = threading.Timer(lifetime, self._expire, (event.assoc,))
            timer.daemon = True
            with self._assoc_lock:
                self._lifetimes[event.assoc] = timer
            timer.start()

    def _record(self, kind: str, action: str, outcome: str, assoc: Association,
                calling: str | None = None, **fields: Any) -> None:
        """``calling``: the calling AE title where the association has not set it yet."""
        if self._audit is None:
            return
        requestor = assoc.requestor
        if calling is None:
            calling = str(requestor.ae_title)
        self._audit.write(kind, "dimse", action, outcome,
                          principal="ae:" + _printable(calling),
                          source=str(requestor.address), auth="calling_ae",
                          association=assoc.name, tls=self._tls is not None,
                          client_subject=_client_subject(assoc), **fields)

    def _on_echo(self, event: Event) -> int:
        self._metrics.requests.labels("dimse", "echo", "ok").inc()
        return SUCCESS

    def _on_store(self, event: Event) -> Dataset:
        arrival = time.perf_counter()
        decoded: Dataset | None = None  # for the audit record of a refusal
        try:
            self._ingestor.check_capacity()
            encoded = getattr(event.request, "DataSet", None)  # C-STORE-RQ: BytesIO of the set
            size = encoded.getbuffer().nbytes if encoded is not None else 0
            self._ingestor.check_size(size)
            self._count_association_bytes(event, size)
            if encoded is not None and event.context.transfer_syntax == \
                    DeflatedExplicitVRLittleEndian:
                check_inflated(encoded.getvalue())  # pynetdicom would inflate it whole
            try:
                ds = decoded = event.dataset
                ds.file_meta = event.file_meta
            except Exception as exc:  # pynetdicom decodes lazily; any decode error lands here
                raise InvalidInstance(f"cannot decode data set: {client_text(exc)}",
                                      "unreadable") from exc
            announced = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
            if announced and str(ds.get("SOPClassUID", "")) != announced:
                raise SOPClassMismatch(
                    f"the data set's SOP Class UID {shown_uid(str(ds.get('SOPClassUID', '')))}"
                    f" is not the {shown_uid(announced)} its C-STORE request announced",
                    "sop_class_mismatch")
            calling = str(event.assoc.requestor.ae_title).strip() or None
            # a result coming back about a de-identified study: re-identified, not inferred
            if not self._ingestor.take_returning(ds, "dimse", calling):
                lanes = self._ingestor.check(ds, calling)
                self._ingestor.accept(_spooled_bytes(event), ds, "dimse", arrival,
                                      time.perf_counter(), calling, lanes)
        except GatewayError as exc:
            return self._refuse(exc, event, decoded, arrival)
        LOG.debug("C-STORE of %s acknowledged (association %s)",
                  uid_hash(str(ds.SOPInstanceUID)), event.assoc.name)
        self._record_store(event, ds, "ok", SUCCESS, None, arrival)
        return _status(SUCCESS)

    def _record_store(self, event: Event, ds: Dataset | None, outcome: str, code: int,
                      reason: str | None, arrival: float) -> None:
        if self._audit is None:
            return
        uids = AuditContext()
        if ds is not None:
            for kind, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
                                  ("instance", "SOPInstanceUID")):
                try:
                    value = str(ds.get(keyword, "") or "")
                except Exception:  # a malformed element: nothing to hash
                    value = ""
                if value:
                    uids.add(kind, uid_hash(value))
        self._record("instance", "store", outcome, event.assoc, status=f"0x{code:04X}",
                     reason=reason, uids=uids,
                     duration_ms=(time.perf_counter() - arrival) * 1000.0)

    def _refuse(self, exc: GatewayError, event: Event, ds: Dataset | None = None,
                arrival: float | None = None) -> Dataset:
        code = dimse_status(exc)
        LOG.warning("C-STORE refused with 0x%04X: %s (association %s)", code, exc.reason,
                    event.assoc.name)
        self._metrics.requests.labels("dimse", "refused", exc.reason).inc()
        self._record_store(event, ds, "refused", code, exc.reason,
                           arrival if arrival is not None else time.perf_counter())
        return _status(code, str(exc))
