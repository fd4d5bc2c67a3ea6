"""The gateway process: wires config, core, spool, worker and the edges (DIMSE, DICOMweb
STOW-RS, REST, Open Inference Protocol v2 over REST and gRPC)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

import numpy as np
import uvicorn

from optimizer.contract.manifest import Manifest
from services.errors import ConfigError, ServiceError
from services.gateway.config import GatewayConfig
from services.gateway.delivery.routing import load_routes
from services.gateway.delivery.service import DeliveryService
from services.gateway.dicom.parsing import read_leniently
from services.gateway.edges import dicomweb, oip_rest
from services.gateway.edges.dimse import DicomServer
from services.gateway.edges.oip import Dataplane
from services.gateway.edges.oip_grpc import OipGrpcServer
from services.gateway.edges.rest import create_app, error_response
from services.gateway.errors import Unavailable
from services.gateway.inference.core import InferenceCore, Inferer
from services.gateway.inference.triton import BREAKER_STATES, CircuitBreaker, TritonInferer
from services.gateway.intake.ingest import Ingestor
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import quiet_identifier_quoting_loggers
from services.gateway.processing.grouping import GroupingPolicy
from services.gateway.processing.worker import SpoolWorker
from services.gateway.security.audit import AuditLog
from services.gateway.security.auth import KeyStore
from services.gateway.security.connections import ConnectionGuard, ConnectionLimits
from services.gateway.security.guard import (
    Guard,
    GuardInterceptor,
    GuardMiddleware,
    PeerCertificates,
)
from services.gateway.security.ratelimit import ConcurrencyCap, RateLimiter
from services.gateway.security.tls import CertFiles, ReloadingGrpcCredentials, ReloadingSSLContext
from services.gateway.store.jobs import STATES as JOB_STATES
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool

LOG = logging.getLogger(__name__)


def _is_state(breaker: CircuitBreaker, state: str) -> float:
    return float(breaker.state == state)


class ServingInferer(Inferer, Protocol):
    """What the gateway needs from its Triton edge (TritonInferer; a fake in unit tests)."""

    def ready(self) -> bool: ...

    def close(self) -> None: ...


class Gateway:
    """Start with ``start()``; ``stop()`` closes listeners first, then drains the worker."""

    def __init__(self, config: GatewayConfig, inferer: ServingInferer | None = None) -> None:
        """``inferer`` replaces the Triton gRPC client (tests, embedding); by default the
        gateway talks to ``config.triton_grpc_url``."""
        self.config = config
        self.manifest = Manifest.load(config.manifest_path)
        if self.manifest.name != config.model_name:
            raise ConfigError(f"manifest names model {self.manifest.name!r}, "
                              f"configured model is {config.model_name!r}")
        read_leniently()
        self.metrics = GatewayMetrics()
        self.inferer: ServingInferer = inferer or TritonInferer(
            config.triton_grpc_url, config.model_name, self.manifest.input.name,
            self.manifest.output.name, config.triton_timeout_s,
            CircuitBreaker(config.triton_breaker_failures, config.triton_breaker_cooldown_s),
        )
        self.core = InferenceCore(self.manifest, self.inferer)
        self.spool = Spool(config.spool_dir)
        self.results = ResultStore(config.spool_dir)
        # Results delivery when routes are configured: the worker hands completed groups to
        # its outbox; delivered groups mark their jobs delivered in the worker's job table.
        self.delivery = (DeliveryService(load_routes(config.routes_file), config.spool_dir,
                                         self.manifest, self.metrics,
                                         mark_delivered=self._mark_delivered)
                         if config.routes_file is not None else None)
        self.worker = SpoolWorker(
            self.core, self.spool, self.results, self.metrics, config.triton_retry_backoff_s,
            sink=self.delivery, retention_s=config.job_retention_s,
            policy=GroupingPolicy.resolve(self.manifest, config.group_level,
                                          config.group_timeout_s))
        self._export_state_metrics()
        self.ingestor = Ingestor(self.core, self.spool, self.worker, self.metrics,
                                 config.max_spool_depth, config.max_request_bytes,
                                 config.min_free_bytes, returns=self.delivery)
        self.audit = AuditLog(config.audit_log, config.audit_syslog)
        self.guard = Guard(
            KeyStore(config.api_keys) if config.api_keys is not None else None, self.audit,
            RateLimiter(config.rate_limit_per_s, config.rate_limit_burst),
            ConcurrencyCap(config.max_concurrent_requests), config.allowed_sources,
            self.metrics)
        cert_files = (CertFiles(config.tls_cert, config.tls_key, config.tls_ca)
                      if config.http_tls and config.tls_cert and config.tls_key else None)
        self.dimse = DicomServer(config, self.ingestor, self.metrics, audit=self.audit)
        self.oip = Dataplane(self.core, self.results, self.metrics, self.ready)
        self.grpc = (OipGrpcServer(
            self.oip, self.metrics, config.http_host, config.grpc_port,
            config.max_request_bytes, interceptors=[GuardInterceptor(self.guard)],
            credentials=(ReloadingGrpcCredentials(cert_files).credentials
                         if cert_files is not None else None),
            handshake_timeout_s=config.http_header_timeout_s)
                     if config.grpc_port else None)
        app = create_app(
            self.core, self.results, self.metrics, self.ready, config.max_request_bytes,
            self.ingestor,
            extra_routes=[*dicomweb.create_routes(self.ingestor, self.metrics,
                                                  config.max_request_bytes),
                          *oip_rest.create_routes(self.oip, self.metrics,
                                                  config.max_request_bytes)],
        )
        peers = PeerCertificates()
        self.connections = ConnectionGuard(
            ConnectionLimits(config.http_header_timeout_s, config.http_body_timeout_s,
                             config.max_connections_per_source),
            self.audit, self.metrics, error_response)
        tls_options: dict[str, Any] = {"http": self.connections.protocol_class()}
        if cert_files is not None:
            reloading = ReloadingSSLContext(cert_files, "optional")
            tls_options = {"ssl_context_factory": lambda _config, _default: reloading.context,
                           "http": peers.protocol_class(self.connections.protocol_class())}
        self._http = uvicorn.Server(uvicorn.Config(
            GuardMiddleware(app, self.guard, error_response, peers), host=config.http_host,
            port=config.http_port, log_level="warning", access_log=False, lifespan="off",
            # uvicorn annotates int; it is only passed to loop.call_later, which takes seconds
            timeout_keep_alive=config.http_keep_alive_s,  # type: ignore[arg-type]
            **tls_options,
        ))
        self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)

    def _export_state_metrics(self) -> None:
        """Job states (read from the job table at scrape time) and the breaker's state."""
        jobs = self.worker.jobs
        for state in JOB_STATES:
            self.metrics.jobs.labels(state).set_function(partial(jobs.count, state))
        breaker = getattr(self.inferer, "breaker", None)
        if isinstance(breaker, CircuitBreaker):
            for state in BREAKER_STATES:
                self.metrics.triton_breaker.labels(state).set_function(
                    partial(_is_state, breaker, state))

    def _mark_delivered(self, names: Sequence[str]) -> None:
        self.worker.jobs.mark_delivered(names)

    def ready(self) -> bool:
        return (self.dimse.listening and self._http.started and self.worker.alive
                and (self.delivery is None or self.delivery.alive)
                and (self.grpc is None or self.grpc.listening) and self.inferer.ready())

    def _warm_up(self) -> None:
        """One zero-image inference: opens the gRPC channel and checks that Triton takes the
        manifest's input shape. Triton being down is not fatal: spooled work waits for it."""
        try:
            self.inferer.infer(np.zeros((1, *self.manifest.input.shape), dtype=np.float32))
        except Unavailable as exc:
            LOG.warning("warm-up inference failed (%s); starting anyway", exc.reason)

    def start(self, timeout_s: float = 10.0) -> None:
        quiet_identifier_quoting_loggers()  # before anything builds or parses a data set
        self._warm_up()
        if self.delivery is not None:
            self.delivery.start()
        self.worker.start()
        self.dimse.start()
        if self.grpc is not None:
            try:
                self.grpc.start()
            except ServiceError:
                self.stop()
                raise
        self._http_thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._http.started:
            if time.monotonic() > deadline or not self._http_thread.is_alive():
                self.stop()
                raise ServiceError(f"HTTP listener did not start on port {self.config.http_port}")
            time.sleep(0.02)
        LOG.info("gateway ready: http %s:%d, grpc %s, dicom %s:%d", self.config.http_host,
                 self.config.http_port, self.config.grpc_port or "off",
                 self.config.dicom_host, self.config.dicom_port)

    def stop(self) -> None:
        self.dimse.stop()
        if self.grpc is not None:
            self.grpc.stop()
        self._http.should_exit = True
        if self._http_thread.is_alive():
            self._http_thread.join(timeout=10)
        self.worker.stop()
        if self.delivery is not None:  # after the worker (no accept in flight), before jobs
            self.delivery.stop()
        self.worker.jobs.close()
        self.inferer.close()
        self.audit.close()
        LOG.info("gateway stopped")
