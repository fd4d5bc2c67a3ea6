"""The audit trail: one JSON object per line per event (request, association, instance),
saying who sent what, when, from where, what was done with it and how it ended.

Targets: a file opened ``O_APPEND`` (each event is one ``write`` of one line, so concurrent
writers and log shippers never see half lines; the gateway never truncates or rewrites it),
``-`` for standard output (containers: the runtime ships it), or syslog (RFC 3164 over UDP to
``host:port``, or a local socket such as ``/dev/log``). With none configured, events go to the
``services.gateway.audit`` logger.

What a record holds: ``time`` (UTC), ``event``, ``protocol``, ``principal`` (``key:NAME``,
``cert:SUBJECT``, ``ae:CALLING_AE`` or null), ``source`` (peer address), ``action``,
``outcome``, ``status``, ``reason``, ``duration_ms`` and the hashed (``uid_hash``) study,
series and instance UIDs concerned. Never raw UIDs, patient names or ids, or any other element
value of the data sets.

Instances an HTTP or gRPC request carried are noted by ``note_dataset`` (called where the
gateway parses DICOM) into the request's audit context (a context variable set by the edge's
guard), so the edge writes one record per request with every instance it touched.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import logging.handlers
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.errors import ConfigError
from services.gateway.phi import uid_hash

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

LOG = logging.getLogger(__name__)
# Bounded lists in one record: a 1000-instance STOW is summarised, not listed in full.
MAX_UIDS_PER_RECORD = 1000


@dataclass
class AuditContext:
    """Hashed UIDs seen while serving one request."""

    study: list[str] = field(default_factory=list)
    series: list[str] = field(default_factory=list)
    instance: list[str] = field(default_factory=list)

    def add(self, kind: str, hashed: str) -> None:
        seen: list[str] = getattr(self, kind)
        if hashed not in seen and len(seen) < MAX_UIDS_PER_RECORD:
            seen.append(hashed)


_CURRENT: contextvars.ContextVar[AuditContext | None] = contextvars.ContextVar(
    "bedside_audit_context", default=None)


@contextmanager
def request_context() -> Iterator[AuditContext]:
    ctx = AuditContext()
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def note_uids(study: str, series: str, instance: str) -> None:
    """Records (hashed) UIDs into the current request's audit context; a no-op outside one."""
    ctx = _CURRENT.get()
    if ctx is None:
        return
    for kind, uid in (("study", study), ("series", series), ("instance", instance)):
        if uid:
            ctx.add(kind, uid_hash(uid))


def note_dataset(ds: Dataset) -> None:
    if _CURRENT.get() is None:
        return
    note_uids(str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
              str(ds.get("SOPInstanceUID", "")))


def _syslog_handler(address: str) -> logging.Handler:
    if address.startswith("/"):
        target: str | tuple[str, int] = address
        kind = socket.SOCK_DGRAM
    else:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"audit syslog address {address!r}: host:port or a socket path")
        target, kind = (host, int(port)), socket.SOCK_DGRAM
    try:
        handler = logging.handlers.SysLogHandler(
            address=target, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV,
            socktype=kind)
    except OSError as exc:
        raise ConfigError(f"audit syslog {address}: {exc.strerror}") from exc
    handler.setFormatter(logging.Formatter("bedside-audit: %(message)s"))
    return handler


class AuditLog:
    """Writes audit records; thread-safe. ``path`` ``-`` is standard output."""

    def __init__(self, path: Path | None = None, syslog: str | None = None) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._stdout = False
        self._syslog: logging.Handler | None = None
        if path is not None and str(path) == "-":
            self._stdout = True
        elif path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                   0o640)
            except OSError as exc:
                raise ConfigError(f"audit log {path}: {exc.strerror}") from exc
        if syslog:
            self._syslog = _syslog_handler(syslog)
        self.path = path

    def write(self, event: str, protocol: str, action: str, outcome: str, *,
              principal: str | None = None, source: str | None = None,
              status: str | int | None = None, reason: str | None = None,
              duration_ms: float | None = None, uids: AuditContext | None = None,
              **extra: Any) -> dict[str, Any]:
        record: dict[str, Any] = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event": event, "protocol": protocol, "principal": principal, "source": source,
            "action": action, "outcome": outcome, "status": status, "reason": reason,
        }
        if duration_ms is not None:
            record["duration_ms"] = round(duration_ms, 3)
        if uids is not None:
            record.update(study=uids.study, series=uids.series, instance=uids.instance)
        record.update(extra)
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
        self._emit(line)
        return record

    def _emit(self, line: str) -> None:
        data = (line + "\n").encode("ascii")
        try:
            with self._lock:
                if self._fd is not None:
                    os.write(self._fd, data)
                elif self._stdout:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
            if self._syslog is not None:
                self._syslog.emit(logging.LogRecord("bedside.audit", logging.INFO, "", 0,
                                                    line, None, None))
            if self._fd is None and not self._stdout and self._syslog is None:
                LOG.info("%s", line)
        except OSError as exc:  # a full disk must not take the service down with it
            LOG.error("audit record not written: %s", exc.strerror)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._syslog is not None:
            self._syslog.close()
