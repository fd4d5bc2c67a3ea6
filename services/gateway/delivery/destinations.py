"""Clients that hand result files to a destination: C-STORE SCU (pynetdicom, optionally over
DICOM TLS) and STOW-RS (http.client, multipart/related).

Each ``send`` either returns (every file stored) or raises ``DeliveryFailed`` (try again later)
or ``DeliveryRejected`` (will never be taken: dead-letter). ``on_stored`` is called for each
file the destination confirmed, so a retry does not send it again. The classification of DIMSE
statuses and HTTP codes is in the two tables below, one per protocol.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

import pydicom
from pynetdicom import AE
from pynetdicom.association import Association

from services.gateway.delivery.routing import Destination, DimseDestination, StowDestination
from services.gateway.errors import DeliveryFailed, DeliveryRejected, GatewayError
from services.gateway.jsonbody import parse_json

LOG = logging.getLogger(__name__)
OnStored = Callable[[Path], None]
Verdict = Literal["stored", "retry", "refused"]


class Sender(Protocol):
    """What the outbox needs from a destination (a fake one in unit tests)."""

    @property
    def name(self) -> str: ...

    def send(self, files: Sequence[Path], on_stored: OnStored) -> None: ...


# -- DIMSE ----------------------------------------------------------------------------------

# C-STORE response statuses (PS3.4 B.2.3, PS3.7 C.4.2). Warnings (0xB000 coercion, 0xB006
# elements discarded, 0xB007 data set does not match SOP class) mean the object was stored;
# 0x0111 (duplicate SOP instance) means the destination already has it.
STORED_STATUSES = (0x0000, 0x0111, 0xB000, 0xB006, 0xB007)
# Out of resources (0xA7xx), processing failure, resource limitation, cancel: retry later.
RETRY_STATUSES = (0x0110, 0x0213, 0xFE00)


def dimse_status_class(status: int) -> Verdict:
    """Everything else is refused for good: 0xA9xx data set does not match the SOP class,
    0xCxxx cannot understand, 0x0122 SOP class not supported, 0x0117 invalid instance..."""
    if status in STORED_STATUSES:
        return "stored"
    if 0xA700 <= status <= 0xA7FF or status in RETRY_STATUSES:
        return "retry"
    return "refused"


class CStoreSender:
    def __init__(self, destination: DimseDestination) -> None:
        self.destination = destination
        self._tls = destination.tls.context() if destination.tls is not None else None

    @property
    def name(self) -> str:
        return self.destination.name

    def send(self, files: Sequence[Path], on_stored: OnStored) -> None:
        d = self.destination
        ae = AE(ae_title=d.calling_aet)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attr, d.timeout_s)
        contexts: dict[str, set[str]] = {}
        for path in files:
            meta = pydicom.filereader.read_file_meta_info(path)
            contexts.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(
                str(meta.TransferSyntaxUID))
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, sorted(syntaxes))
        tls_args = ((self._tls, d.tls.server_name or d.host)
                    if self._tls is not None and d.tls is not None else None)
        assoc = ae.associate(d.host, d.port, ae_title=d.called_aet, tls_args=tls_args)
        if not assoc.is_established and assoc.rejected_contexts:
            # The peer accepted the association but none of our SOP classes: it never will.
            raise DeliveryRejected(f"{d.name}: {d.called_aet} accepts no presentation context "
                                   "for these SOP classes", "sop_class_not_accepted")
        if not assoc.is_established:
            # pynetdicom reports a refused TCP connection as an abort, like a peer's A-ABORT.
            reason = "association_rejected" if assoc.is_rejected else "association_failed"
            raise DeliveryFailed(f"{d.name}: no association with {d.called_aet} at "
                                 f"{d.host}:{d.port} ({reason})", reason)
        try:
            for path in files:
                self._store(assoc, path)
                on_stored(path)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store(self, assoc: Association, path: Path) -> None:
        name = self.destination.name
        try:
            rsp = assoc.send_c_store(path)
        except ValueError as exc:  # no accepted presentation context for the SOP class
            raise DeliveryRejected(f"{name}: the destination accepted no presentation "
                                   f"context for this SOP class ({exc})",
                                   "sop_class_not_accepted") from exc
        if "Status" not in rsp:  # no response: timeout, abort, lost connection
            raise DeliveryFailed(f"{name}: no C-STORE response (timeout or aborted)",
                                 "no_response")
        status = int(rsp.Status)
        verdict = dimse_status_class(status)
        if verdict == "stored":
            return
        if verdict == "retry":
            raise DeliveryFailed(f"{name}: C-STORE status 0x{status:04X}", f"status_{status:04x}")
        raise DeliveryRejected(f"{name}: C-STORE refused with status 0x{status:04X}",
                               f"status_{status:04x}")


# -- STOW-RS --------------------------------------------------------------------------------

# STOW-RS answers (PS3.18 10.5.3): 200 stored; 202 stored with warnings unless the response
# lists failed instances; 5xx and these retry later (401/403: credentials can be fixed without
# a resend); other codes (400 bad request, 409 conflict, 413, 415...) are refused for good.
RETRY_HTTP = (401, 403, 408, 425, 429)


def http_status_class(code: int) -> Verdict:
    if code in (200, 202):
        return "stored"
    if code in RETRY_HTTP or code >= 500:
        return "retry"
    return "refused"


FAILED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081197"


def failed_reasons(body: bytes) -> list[int]:
    """Failure Reason of each item of the response's Failed SOP Sequence (DICOM JSON)."""
    try:
        doc = parse_json(body, "STOW-RS response", max(len(body), 1))
    except GatewayError:  # not JSON, or nested absurdly deep: no reasons to read
        return []
    if isinstance(doc, list):
        doc = doc[0] if doc else {}
    if not isinstance(doc, dict):
        return []
    items = doc.get(FAILED_SOP_SEQUENCE, {}).get("Value", []) or []
    reasons = []
    for item in items:
        value = (item.get(FAILURE_REASON, {}) or {}).get("Value", [0]) if isinstance(
            item, dict) else [0]
        reasons.append(int(value[0]) if value else 0)
    return reasons


class StowSender:
    def __init__(self, destination: StowDestination) -> None:
        self.destination = destination
        parts = urlsplit(destination.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path or "/"
        if parts.query:
            self._path += "?" + parts.query
        self._tls: ssl.SSLContext | None = None
        if self._https:
            self._tls = (destination.tls.context() if destination.tls is not None
                         else ssl.create_default_context())

    @property
    def name(self) -> str:
        return self.destination.name

    def _connection(self) -> http.client.HTTPConnection:
        timeout = self.destination.timeout_s
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                               context=self._tls)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def send(self, files: Sequence[Path], on_stored: OnStored) -> None:
        d = self.destination
        boundary = uuid.uuid4().hex
        chunks = []
        for path in files:
            chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                       path.read_bytes(), b"\r\n"]
        chunks.append(f"--{boundary}--\r\n".encode())
        body = b"".join(chunks)
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary}",
                   "Accept": "application/dicom+json", "Content-Length": str(len(body))}
        if d.authorization:
            headers["Authorization"] = d.authorization
        conn = self._connection()
        try:
            conn.request("POST", self._path, body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            retry_after = response.getheader("Retry-After")
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS
            raise DeliveryFailed(f"{d.name}: STOW-RS request failed: "
                                 f"{type(exc).__name__}: {exc}", "connection_failed") from exc
        finally:
            conn.close()
        code = response.status
        verdict = http_status_class(code)
        failed = failed_reasons(answer) if code in (200, 202, 400, 409) else []
        if verdict == "stored" and not failed:
            for path in files:
                on_stored(path)
            return
        if verdict == "retry":
            error = DeliveryFailed(f"{d.name}: STOW-RS answered HTTP {code}", f"http_{code}")
            error.retry_after_s = _seconds(retry_after)  # type: ignore[attr-defined]
            raise error
        detail = (", failure reasons " + ", ".join(f"0x{r:04X}" for r in failed)) if failed \
            else ""
        raise DeliveryRejected(f"{d.name}: STOW-RS refused the instances: HTTP {code}{detail}",
                               f"http_{code}")


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP-date: the backoff decides


def make_sender(destination: Destination) -> Sender:
    if isinstance(destination, DimseDestination):
        return CStoreSender(destination)
    return StowSender(destination)

