"""One gate in front of the HTTP and gRPC edges: source allowlist, authentication (API key or
client certificate), scope, per-principal rate limit, the cap on concurrent work, and the
audit record of every call. ``Guard`` is the protocol-neutral policy; ``GuardMiddleware``
(ASGI, for the starlette app) and ``GuardInterceptor`` (gRPC) apply it per edge.

Scopes per call (health and readiness need none, and are neither limited nor audited):

- ``infer``: ``POST /v1/infer``, ``POST /v2/models/{m}/infer``; gRPC ``ModelInfer``
- ``submit``: ``POST /v1/studies``, ``POST /dicomweb/studies[/{uid}]``
- ``read``: ``GET /v1/studies/{uid}/results``, ``GET /v2``, ``GET /v2/models/{m}``; gRPC
  ``ServerMetadata``, ``ModelMetadata``
- ``metrics``: ``GET /metrics``

Anything else needs a valid principal (any scope) and then gets the route's own answer
(404, 405, UNIMPLEMENTED), so unauthenticated callers cannot probe which routes exist.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import grpc
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.gateway.errors import (
    Forbidden,
    GatewayError,
    Overloaded,
    RateLimited,
    Unauthenticated,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.security import audit as audit_mod
from services.gateway.security.audit import AuditLog
from services.gateway.security.auth import SCOPES, KeyStore, Principal
from services.gateway.security.ratelimit import ConcurrencyCap, RateLimiter
from services.gateway.security.tls import subject_of
from services.gateway.status import grpc_code

LOG = logging.getLogger(__name__)
ANY = "any"  # an authenticated principal, whatever its scopes
WORK_SCOPES = frozenset({"infer", "submit"})
ANONYMOUS = Principal("anonymous", "none", frozenset(SCOPES))

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Rule:
    """What a call is: ``scope`` None means open (health, readiness)."""

    action: str
    scope: str | None
    protocol: str
    study_param: bool = False


_UID = r"(?P<study>[^/]+)"
HTTP_RULES: tuple[tuple[str, re.Pattern[str], Rule], ...] = tuple(
    (method, re.compile(f"^{pattern}$"), rule) for method, pattern, rule in (
        ("GET", "/healthz", Rule("health", None, "rest")),
        ("GET", "/readyz", Rule("ready", None, "rest")),
        ("GET", "/v2/health/(live|ready)", Rule("health", None, "oip_rest")),
        ("GET", "/v2/models/[^/]+(/versions/[^/]+)?/ready", Rule("ready", None, "oip_rest")),
        ("POST", "/v1/infer", Rule("infer", "infer", "rest")),
        ("POST", "/v1/studies", Rule("submit_study", "submit", "rest")),
        ("GET", f"/v1/studies/{_UID}/results", Rule("read_results", "read", "rest", True)),
        ("POST", "/dicomweb/studies", Rule("stow", "submit", "stow")),
        ("POST", f"/dicomweb/studies/{_UID}", Rule("stow", "submit", "stow", True)),
        ("POST", "/v2/models/[^/]+(/versions/[^/]+)?/infer", Rule("infer", "infer", "oip_rest")),
        ("GET", "/v2", Rule("metadata", "read", "oip_rest")),
        ("GET", "/v2/models/[^/]+(/versions/[^/]+)?", Rule("metadata", "read", "oip_rest")),
        ("GET", "/metrics", Rule("metrics", "metrics", "rest")),
        ("GET", "/v2/models", Rule("metadata", "read", "oip_rest")),
        ("GET", "/v1/models", Rule("models", "read", "rest")),
        # any action (an unknown one answers 404 there, but never without the scope)
        ("POST", "/v1/models/[^/]+/.+", Rule("model_version", "models", "rest")),
    ))
OTHER_HTTP = Rule("other", ANY, "rest")

_GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_RULES: dict[str, Rule] = {
    _GRPC_SERVICE + "ServerLive": Rule("health", None, "oip_grpc"),
    _GRPC_SERVICE + "ServerReady": Rule("ready", None, "oip_grpc"),
    _GRPC_SERVICE + "ModelReady": Rule("ready", None, "oip_grpc"),
    _GRPC_SERVICE + "ServerMetadata": Rule("metadata", "read", "oip_grpc"),
    _GRPC_SERVICE + "ModelMetadata": Rule("metadata", "read", "oip_grpc"),
    _GRPC_SERVICE + "ModelInfer": Rule("infer", "infer", "oip_grpc"),
}
OTHER_GRPC = Rule("other", ANY, "oip_grpc")


def http_rule(method: str, path: str) -> tuple[Rule, str | None]:
    """The rule for a call, and the study UID named in its path (if any)."""
    for m, pattern, rule in HTTP_RULES:
        match = pattern.match(path)
        if match and (m == method or (m == "GET" and method == "HEAD")):
            return rule, match.group("study") if rule.study_param else None
    return OTHER_HTTP, None


def api_key_from(headers: Mapping[str, str]) -> str | None:
    """``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (header names lower-case)."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else ""
    key = headers.get("x-api-key")
    return key.strip() if key is not None else None


class Guard:
    """The policy. ``keys`` None turns authentication off (every caller is ``anonymous`` with
    every scope); the source allowlist, rate limit and concurrency cap still apply."""

    def __init__(self, keys: KeyStore | None, audit: AuditLog, limiter: RateLimiter,
                 cap: ConcurrencyCap, allowed_sources: Iterable[str] = (),
                 metrics: GatewayMetrics | None = None) -> None:
        """``metrics``: where refusals are counted (``bedside_gateway_requests_total`` with
        outcome ``refused``, the edge's protocol and the bounded reason: ``no_credentials``,
        ``bad_key``, ``unknown_certificate``, ``scope``, ``source_not_allowed``,
        ``rate_limited``, ``busy``), as the edges count their own refusals."""
        self.metrics = metrics
        self.keys = keys
        self.audit = audit
        self.limiter = limiter
        self.cap = cap
        self.allowed = tuple(ipaddress.ip_network(s, strict=False) for s in allowed_sources)

    def source_allowed(self, source: str | None) -> bool:
        if not self.allowed:
            return True
        try:
            ip = ipaddress.ip_address(source or "")
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allowed)

    def authenticate(self, key: str | None, cert_subject: str | None) -> Principal:
        if self.keys is None:
            return ANONYMOUS
        if key is not None:
            principal = self.keys.by_key(key) if key else None
            if principal is None:
                raise Unauthenticated("unknown or malformed API key", "bad_key")
            return principal
        if cert_subject:
            principal = self.keys.by_subject(cert_subject)
            if principal is not None:
                return principal
            raise Unauthenticated("client certificate not listed in the keys file and no API "
                                  "key", "unknown_certificate")
        raise Unauthenticated("credentials required: Authorization: Bearer <key> or X-API-Key",
                              "no_credentials")

    def admit(self, rule: Rule, source: str | None, key: str | None,
              cert_subject: str | None) -> tuple[Principal, Callable[[], None]]:
        """The caller and a release callable, or a GatewayError saying why not (counted)."""
        try:
            return self._admit(rule, source, key, cert_subject)
        except GatewayError as exc:
            if self.metrics is not None:
                self.metrics.requests.labels(rule.protocol, "refused", exc.reason).inc()
            raise

    def _admit(self, rule: Rule, source: str | None, key: str | None,
               cert_subject: str | None) -> tuple[Principal, Callable[[], None]]:
        if not self.source_allowed(source):
            raise Forbidden("source address not allowed", "source_not_allowed")
        principal = self.authenticate(key, cert_subject)
        if rule.scope not in (None, ANY) and rule.scope not in principal.scopes:
            raise Forbidden(f"{principal.label} lacks scope {rule.scope!r}", "scope")
        # Per key: without authentication there are no keys to limit (a deliberate choice for
        # trusted networks and load tests); the concurrency cap still holds.
        wait = (self.limiter.take(principal.label, principal.rate_per_s, principal.burst)
                if principal is not ANONYMOUS else 0.0)
        if wait > 0:
            raise RateLimited(f"rate limit for {principal.label} reached; retry in "
                              f"{wait:.1f} s", "rate_limited", wait)
        if rule.scope in WORK_SCOPES:
            if not self.cap.try_enter():
                raise Overloaded(f"{self.cap.limit} requests already in progress; retry "
                                 "shortly", "busy", 1.0)
            return principal, self.cap.leave
        return principal, _nothing


def _nothing() -> None:
    return None


def _once(release: Callable[[], None]) -> Callable[[], None]:
    done = threading.Event()

    def wrapper() -> None:
        if not done.is_set():
            done.set()
            release()

    return wrapper


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return "failed" if status >= 500 and status != 503 else "refused"


# ---- HTTP ------------------------------------------------------------------------------


class PeerCertificates:
    """Verified client-certificate subjects of open HTTP connections, by peer address:
    uvicorn puts no certificate in the ASGI scope, so its h11 protocol records them here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subjects: dict[tuple[str, int], str] = {}

    def subject(self, client: Any) -> str | None:
        if not client:
            return None
        with self._lock:
            return self._subjects.get((client[0], client[1]))

    def protocol_class(self, base: type[H11Protocol] = H11Protocol) -> type[H11Protocol]:
        """``base``: the protocol to record on top of (``connections.ConnectionGuard``'s)."""
        registry = self

        class _RecordingH11Protocol(base):  # type: ignore[valid-type, misc]
            def connection_made(self, transport: asyncio.Transport) -> None:
                super().connection_made(transport)
                subject = subject_of(transport.get_extra_info("peercert"))
                if subject and self.client:
                    with registry._lock:
                        registry._subjects[(self.client[0], self.client[1])] = subject

            def connection_lost(self, exc: Exception | None) -> None:
                if self.client:
                    with registry._lock:
                        registry._subjects.pop((self.client[0], self.client[1]), None)
                super().connection_lost(exc)

            def shutdown(self) -> None:
                """Server stop: an idle TLS connection that is closing waits (asyncio's SSL
                shutdown, up to 30 s) for the peer's close_notify, which an idle client never
                sends; such a connection is dropped at once instead. Requests in progress still
                finish."""
                super().shutdown()
                if self.transport.is_closing():
                    self.transport.abort()

        return _RecordingH11Protocol


class GuardMiddleware:
    """ASGI middleware: admission before the app sees the request, one audit record after."""

    def __init__(self, app: ASGIApp, guard: Guard,
                 error_response: Callable[[GatewayError], Any],
                 peers: PeerCertificates | None = None) -> None:
        """``error_response``: the HTTP edge's error body for a refused call (the composition
        root passes the REST edge's, so refusals look like every other REST error)."""
        self.app = app
        self.guard = guard
        self.peers = peers
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule, study = http_rule(scope["method"], scope["path"])
        if rule.scope is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        client = scope.get("client")
        source = client[0] if client else None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        subject = self.peers.subject(client) if self.peers is not None else None
        with audit_mod.request_context() as uids:
            if study:
                audit_mod.note_uids(study, "", "")
            try:
                principal, release_once = self.guard.admit(rule, source,
                                                           api_key_from(headers), subject)
                release = _once(release_once)
            except GatewayError as exc:
                response = self.error_response(exc)
                self.guard.audit.write(
                    "request", rule.protocol, rule.action, exc.reason, principal=None
                    if isinstance(exc, Unauthenticated) else _label(self.guard, headers,
                                                                   subject),
                    source=source, status=response.status_code, reason=exc.reason,
                    duration_ms=(time.perf_counter() - start) * 1000.0, uids=uids,
                    auth="api_key" if _has_key(headers) else "client_cert" if subject
                    else "none", client_subject=subject)
                LOG.warning("%s %s refused: %s", rule.protocol, rule.action, exc.reason)
                await response(scope, receive, send)
                return
            status = {"code": 500}
            written: list[bool] = []

            def record() -> None:
                if written:
                    return
                written.append(True)
                code = status["code"]
                self.guard.audit.write(
                    "request", rule.protocol, rule.action, _outcome(code),
                    principal=principal.label, source=source, status=code,
                    reason=None if code < 400 else "http_" + str(code),
                    duration_ms=(time.perf_counter() - start) * 1000.0, uids=uids,
                    auth=principal.kind, client_subject=subject)

            async def recording_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = int(message["status"])
                elif message["type"] == "http.response.body" and not message.get("more_body"):
                    release()  # the work is done; the record is on file before the caller
                    record()   # has the whole answer
                await send(message)

            try:
                await self.app(scope, receive, recording_send)
            finally:
                release()
                record()


def _has_key(headers: Mapping[str, str]) -> bool:
    return "authorization" in headers or "x-api-key" in headers


def _label(guard: Guard, headers: Mapping[str, str], subject: str | None) -> str | None:
    """Who a refused (but authenticated) caller was, for the audit record."""
    try:
        return guard.authenticate(api_key_from(headers), subject).label
    except GatewayError:
        return None


# ---- gRPC ------------------------------------------------------------------------------


def grpc_source(peer: str) -> str | None:
    """``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` -> the address."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return None


def grpc_subject(context: grpc.ServicerContext) -> str | None:
    props = context.auth_context() or {}
    subject = props.get("x509_subject")
    if subject:
        return bytes(subject[0]).decode("utf-8", "replace")
    common = props.get("x509_common_name")
    if common:
        return "CN=" + bytes(common[0]).decode("utf-8", "replace")
    return None


def _code_name(context: grpc.ServicerContext) -> str:
    code = context.code() if hasattr(context, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class GuardInterceptor(grpc.ServerInterceptor):
    """The gRPC edge's gate (unary-unary methods: every OIP v2 method the gateway offers)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        rule = GRPC_RULES.get(method, OTHER_GRPC)
        if rule.scope is None:
            return handler
        metadata = {k.lower(): v for k, v in
                    (handler_call_details.invocation_metadata or ())
                    if isinstance(v, str)}
        inner = handler.unary_unary if handler is not None else None
        if handler is not None and inner is None:
            return handler  # streaming: not offered by this gateway

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            source = grpc_source(context.peer())
            subject = grpc_subject(context)
            with audit_mod.request_context() as uids:
                try:
                    principal, release = self.guard.admit(rule, source,
                                                          api_key_from(metadata), subject)
                except GatewayError as exc:
                    code = grpc_code(exc)
                    self.guard.audit.write(
                        "request", rule.protocol, rule.action, exc.reason,
                        principal=None if isinstance(exc, Unauthenticated)
                        else _label(self.guard, metadata, subject),
                        source=source, status=code.name, reason=exc.reason,
                        duration_ms=(time.perf_counter() - start) * 1000.0, uids=uids,
                        auth="api_key" if _has_key(metadata) else "client_cert" if subject
                        else "none", client_subject=subject)
                    LOG.warning("oip_grpc %s refused: %s", rule.action, exc.reason)
                    context.abort(code, str(exc))
                    raise  # abort raised already
                outcome, status = "ok", "OK"
                try:
                    if inner is None:
                        context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
                    return inner(request, context)  # type: ignore[misc]
                except Exception:
                    status = _code_name(context)
                    outcome = "failed" if status in ("INTERNAL", "UNKNOWN") else "refused"
                    raise
                finally:
                    release()
                    self.guard.audit.write(
                        "request", rule.protocol, rule.action, outcome,
                        principal=principal.label, source=source, status=status,
                        reason=None if outcome == "ok" else status.lower(),
                        duration_ms=(time.perf_counter() - start) * 1000.0, uids=uids,
                        auth=principal.kind, client_subject=subject)

        if handler is None:
            return grpc.unary_unary_rpc_method_handler(guarded)
        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
