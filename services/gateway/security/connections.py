"""Limits on HTTP connections, below the requests that ``guard`` admits: how long a client may
take to send its request, and how many connections one source address may hold.

uvicorn closes a connection idle between requests (``timeout_keep_alive``) but times nothing
else: a client that sends its request head one byte a second, or stops half-way through a body,
holds its connection (and a file descriptor, and memory) for as long as it likes, and a few
hundred such clients exhaust the listener. ``ConnectionGuard.protocol_class`` is uvicorn's h11
protocol with three more rules:

- header timeout: the request head (request line and headers) must be complete within
  ``header_timeout_s`` of the connection opening or of the previous response ending; bytes
  arriving meanwhile do not extend it. A client that sent part of a head gets 408; one that sent
  nothing is closed without an answer (a browser's pre-opened connection, a port scan).
- body timeout: while a request body arrives, no pause between its bytes may last longer than
  ``body_timeout_s`` (a pause the gateway causes, by not reading yet or by not having sent
  ``100 Continue``, does not count). Past it: 408 if no answer was started, and the connection
  is closed; the edge reading the body sees the client gone.
- per-source cap: one source address may hold ``per_source`` connections; beyond, each further
  connection is answered 429 + ``Retry-After`` (``Connection: close``) at its first request,
  and beyond twice the cap it is closed at once, so that a flood of refused connections cannot
  hold sockets either. 0 means no cap. With several gateway processes on one port the counts
  are the pod's (``podstate.PodState``), so the cap is per pod, not per process. The cap sees
  the address the TCP connection comes from: behind an ingress or a load balancer that is
  the proxy's, not the client's.

Every timeout and refusal is logged with the source address and the reason, counted in
``bedside_gateway_requests_total`` (protocol ``http``, outcome ``refused``, reason
``header_timeout``, ``body_timeout`` or ``source_connection_limit``) and audited (event
``connection``). Nothing of a request is read or written down: no path, no header, no UID.

Composition: ``PeerCertificates.protocol_class(base)`` in ``guard`` records client certificates
on top of this class, so TLS and client-certificate principals keep working.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.gateway.errors import GatewayError, RateLimited, RequestTimeout
from services.gateway.metrics import GatewayMetrics
from services.gateway.security.audit import AuditLog
from services.gateway.security.podstate import PodState

LOG = logging.getLogger(__name__)
ADMIT, REFUSE, DROP = "admit", "refuse", "drop"
CAP_REASON = "source_connection_limit"
CAP_RETRY_AFTER_S = 1.0
# A closing TLS connection waits for the peer's close_notify (asyncio: up to 30 s); a client
# that stalled on purpose never sends one, so a timed-out connection is aborted after this.
ABORT_AFTER_S = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    per_source: int  # 0: no cap


class SourceCounts:
    """Open connections per source address: admitted ones (at most ``limit``) and refused ones
    still open (at most ``limit`` more); the verdict for a new one.

    With ``pod`` (several gateway processes share the port), both counts are the pod's: holds
    ``src:<address>`` and ``src-refused:<address>`` in ``PodState``, kept per process, so the
    supervisor's release of a dead process gives its connections back. Without, they are this
    process's own."""

    def __init__(self, limit: int, pod: PodState | None = None) -> None:
        self.limit = limit
        self._pod = pod
        self._lock = threading.Lock()
        self._open: dict[str, list[int]] = {}  # source -> [admitted, refused]

    def open(self, source: str | None) -> str:
        if not self.limit or source is None:
            return ADMIT
        if self._pod is not None:
            if self._pod.hold(f"src:{source}", self.limit) is None:
                return ADMIT
            if self._pod.hold(f"src-refused:{source}", self.limit) is None:
                return REFUSE
            return DROP
        with self._lock:
            counts = self._open.setdefault(source, [0, 0])
            if counts[0] < self.limit:
                counts[0] += 1
                return ADMIT
            if counts[1] < self.limit:
                counts[1] += 1
                return REFUSE
            return DROP

    def close(self, source: str | None, verdict: str) -> None:
        if not self.limit or source is None or verdict == DROP:
            return
        if self._pod is not None:
            self._pod.release(f"src:{source}" if verdict == ADMIT else f"src-refused:{source}")
            return
        with self._lock:
            counts = self._open.get(source)
            if counts is None:
                return
            counts[0 if verdict == ADMIT else 1] -= 1
            if counts == [0, 0]:
                del self._open[source]

    def admitted(self, source: str) -> int:
        if self._pod is not None:
            return self._pod.held(f"src:{source}")
        with self._lock:
            return self._open.get(source, [0, 0])[0]


class ConnectionGuard:
    """The policy and its records; ``protocol_class()`` applies it to uvicorn connections."""

    def __init__(self, limits: ConnectionLimits, audit: AuditLog, metrics: GatewayMetrics,
                 error_response: Callable[[GatewayError], Any],
                 pod: PodState | None = None) -> None:
        """``error_response``: the HTTP edge's error response (a Starlette ``Response``), so
        that a 408 or 429 here has the body of every other REST error. ``pod``: the pod's
        shared state when several processes share the port (the per-source cap is the pod's)."""
        self.limits = limits
        self.audit = audit
        self.metrics = metrics
        self.error_response = error_response
        self.counts = SourceCounts(limits.per_source, pod)

    def _cap_error(self) -> RateLimited:
        return RateLimited(f"more than {self.limits.per_source} connections from this "
                           "address; close some or retry shortly", CAP_REASON,
                           CAP_RETRY_AFTER_S)

    def refused(self, source: str | None, verdict: str) -> None:
        """Count, log and audit a connection over the per-source cap."""
        self.metrics.requests.labels("http", "refused", CAP_REASON).inc()
        how = "answered 429" if verdict == REFUSE else "closed at once"
        LOG.warning("HTTP connection from %s refused (%s): %s, %d open", source, how,
                    CAP_REASON, self.counts.admitted(source or ""))
        self.audit.write("connection", "http", "connect", CAP_REASON, source=source,
                         status=429 if verdict == REFUSE else "closed", reason=CAP_REASON)

    def timed_out(self, source: str | None, reason: str, answered: bool) -> None:
        """Count, log and audit a connection closed for a header or body timeout."""
        self.metrics.requests.labels("http", "refused", reason).inc()
        LOG.warning("HTTP connection from %s closed: %s", source, reason)
        self.audit.write("connection", "http", "read", reason, source=source,
                         status=408 if answered else "closed", reason=reason)

    def timeout_answer(self, reason: str) -> bytes:
        """The raw 408 response (written below h11, whose state may not allow one)."""
        seconds = (self.limits.header_timeout_s if reason == "header_timeout"
                   else self.limits.body_timeout_s)
        what = "request head" if reason == "header_timeout" else "request body"
        response = self.error_response(RequestTimeout(
            f"the {what} did not arrive within {seconds:g} s", reason))
        status = int(response.status_code)
        head = [f"HTTP/1.1 {status} Request Timeout".encode("ascii")]
        head += [k + b": " + v for k, v in response.raw_headers if k.lower() != b"connection"]
        head.append(b"connection: close")
        return b"\r\n".join(head) + b"\r\n\r\n" + bytes(response.body)

    async def refuse(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI app a connection over the cap gets instead of the gateway's."""
        response = self.error_response(self._cap_error())
        response.headers["connection"] = "close"
        await response(scope, receive, send)

    def protocol_class(self, base: type[H11Protocol] = H11Protocol) -> type[H11Protocol]:
        guard = self

        class LimitedH11Protocol(base):  # type: ignore[valid-type, misc]
            _timer: asyncio.TimerHandle | None = None
            _waiting: str | None = None  # "header" or "body": what the timer waits for
            _source: str | None = None
            _verdict: str = ADMIT

            def connection_made(self, transport: asyncio.Transport) -> None:
                super().connection_made(transport)
                self._source = self.client[0] if self.client else None
                self._verdict = guard.counts.open(self._source)
                if self._verdict != ADMIT:
                    guard.refused(self._source, self._verdict)
                if self._verdict == DROP:
                    transport.abort()
                    return
                if self._verdict == REFUSE:
                    self.app = guard.refuse  # answered at its first request, then closed
                self._arm("header")

            def connection_lost(self, exc: Exception | None) -> None:
                self._disarm()
                guard.counts.close(self._source, self._verdict)
                self._verdict = DROP  # counted down once
                super().connection_lost(exc)

            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                self._follow()

            def on_response_complete(self) -> None:
                super().on_response_complete()
                self._follow()

            def _follow(self) -> None:
                """Arm, re-arm or cancel the timer for what the connection waits for now."""
                if self.transport.is_closing():
                    self._disarm()
                    return
                state = self.conn.their_state
                if state is h11.IDLE:
                    if self._waiting != "header":  # a deadline: bytes do not extend it
                        self._arm("header")
                elif state is h11.SEND_BODY:
                    self._arm("body")  # a pause limit: every read starts it again
                else:
                    self._disarm()

            def _arm(self, what: str) -> None:
                self._disarm()
                seconds = (guard.limits.header_timeout_s if what == "header"
                           else guard.limits.body_timeout_s)
                self._waiting = what
                self._timer = self.loop.call_later(seconds, self._expired)

            def _disarm(self) -> None:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer, self._waiting = None, None

            def _expired(self) -> None:
                what, self._timer = self._waiting, None
                if what is None or self.transport.is_closing():
                    return
                cycle = self.cycle
                if what == "body" and (self.flow.read_paused or (
                        cycle is not None and cycle.waiting_for_100_continue)):
                    self._arm("body")  # the gateway is not reading yet: not the client's pause
                    return
                reason = f"{what}_timeout"
                if what == "header":
                    answer = bool(self.conn.trailing_data[0])  # part of a head arrived
                else:
                    answer = cycle is not None and not cycle.response_started
                if answer:
                    self.transport.write(guard.timeout_answer(reason))
                if cycle is not None and not cycle.response_complete:
                    cycle.disconnected = True  # the app's reads end, its answer is dropped
                    cycle.message_event.set()
                guard.timed_out(self._source, reason, answer)
                self._waiting = None
                self.transport.close()
                self.loop.call_later(ABORT_AFTER_S, self.transport.abort)

        return LimitedH11Protocol
