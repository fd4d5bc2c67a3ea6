"""The gateway process: wires config, core, spool, worker and the edges (DIMSE, DICOMweb
STOW-RS, REST, Open Inference Protocol v2 over REST and gRPC)."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Protocol, cast

import numpy as np
import uvicorn

from optimizer.contract.manifest import Manifest
from services.errors import ConfigError, ServiceError
from services.gateway.config import POSTGRESQL, GatewayConfig
from services.gateway.delivery.routing import load_routes
from services.gateway.delivery.service import DeliveryService
from services.gateway.dicom.parsing import read_leniently
from services.gateway.edges import dicomweb, oip_rest
from services.gateway.edges import models as models_edge
from services.gateway.edges.dimse import DicomServer
from services.gateway.edges.oip import Dataplane
from services.gateway.edges.oip_grpc import OipGrpcServer
from services.gateway.edges.rest import create_app, error_response
from services.gateway.errors import Unavailable
from services.gateway.inference.core import InferenceCore, Inferer
from services.gateway.inference.triton import (
    BREAKER_STATES,
    CircuitBreaker,
    TritonInferer,
    load_versions,
)
from services.gateway.inference.versions import VersionedCore, VersionPlan, plan_from
from services.gateway.intake.ingest import Ingestor
from services.gateway.intake.models import (
    ModelLane,
    ModelVersions,
    ShadowRecorder,
    VersionFollower,
    lane_root,
)
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
from services.gateway.security.podstate import PodState
from services.gateway.security.ratelimit import ConcurrencyCap, RateLimiter
from services.gateway.security.tls import CertFiles, ReloadingGrpcCredentials, ReloadingSSLContext
from services.gateway.store.durable import SHARED_VOLUME, WAL
from services.gateway.store.jobdb import JobDbError
from services.gateway.store.jobs import STATES as JOB_STATES
from services.gateway.store.jobs import JobTable
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import Spool
from services.gateway.store.versions import VersionStore

LOG = logging.getLogger(__name__)


def _is_state(breaker: CircuitBreaker, state: str) -> float:
    return float(breaker.state == state)


class ServingInferer(Inferer, Protocol):
    """What the gateway needs from its Triton edge (TritonInferer; a fake in unit tests)."""

    def ready(self) -> bool: ...

    def close(self) -> None: ...


def _load_manifest(config: GatewayConfig, name: str) -> Manifest:
    manifest = Manifest.load(config.model_repository / name / "manifest.json")
    if manifest.name != name:
        raise ConfigError(f"manifest names model {manifest.name!r}, "
                          f"configured model is {name!r}")
    return manifest


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes of the pod bind too (SO_REUSEPORT): the
    kernel spreads new connections over them. Created with IPPROTO_TCP named, as asyncio's own
    listeners are: asyncio sets TCP_NODELAY only on connections of such a socket (without it,
    Nagle's algorithm and delayed ACKs add ~40 ms to a response written in two parts)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


class Gateway:
    """Start with ``start()``; ``stop()`` closes listeners first, then drains the worker."""

    def __init__(self, config: GatewayConfig, inferer: ServingInferer | None = None,
                 inferers: Mapping[str, ServingInferer] | None = None,
                 pod: PodState | None = None) -> None:
        """``inferer`` replaces the Triton gRPC client of the default model, ``inferers``
        those of the other served models by name (tests, embedding); by default the gateway
        talks to ``config.triton_grpc_url``. Every served model's manifest is loaded and
        checked (grouping, selection rules) here: a bad one stops the start with its reason.
        ``pod``: this process is one of several of a pod (``bedside gateway --processes``):
        its listeners share their ports with the others and its rate and association limits
        are the pod's."""
        self.config = config
        self.pod = pod
        self.manifest = _load_manifest(config, config.model_name)
        others = {name: _load_manifest(config, name) for name in config.served_models[1:]}
        read_leniently()
        self.metrics = GatewayMetrics()
        # Versions: the primary each model's manifest names, unless a promotion or rollback
        # saved another (store/versions.py); shadow and canary versions from the settings.
        self.version_store = VersionStore(config.spool_dir)
        self._saved_versions = self.version_store.load()
        self._version_settings = config.version_settings()
        unknown = sorted(set(self._version_settings) - set(config.served_models))
        if unknown:
            raise ConfigError(f"--shadow/--canary name model(s) {unknown} this gateway does "
                              f"not serve ({', '.join(config.served_models)})")
        self._injected: dict[str, ServingInferer] = dict(inferers or {})
        if inferer is not None:
            self._injected[self.manifest.name] = inferer
        self.recorders: dict[str, ShadowRecorder] = {}
        self._manifest_versions: dict[str, int] = {}  # each model's manifest version
        self._version_labels: dict[str, list[tuple[str, str, str]]] = {}
        self.core = self._versioned(self.manifest)
        self.inferer = cast(ServingInferer, self.core.inferer)
        self.spool = Spool(config.spool_dir)
        self.results = ResultStore(config.spool_dir)
        # Results delivery when routes are configured: the workers hand completed groups to
        # one outbox; delivered groups mark their jobs delivered in their model's job table.
        routes = load_routes(config.routes_file) if config.routes_file is not None else None
        if routes is not None:
            routes.check_models(config.served_models)
        self.delivery = (DeliveryService(routes, config.spool_dir, self.manifest, self.metrics,
                                         mark_delivered=self._mark_delivered,
                                         manifests={self.manifest.name: self.manifest,
                                                    **others},
                                         journal=(SHARED_VOLUME
                                                  if config.job_table.dialect == POSTGRESQL
                                                  else WAL))
                         if routes is not None else None)
        try:
            jobs = JobTable(config.spool_dir, config.job_table)
        except JobDbError as exc:
            raise ConfigError(str(exc)) from None
        LOG.info("job table: %s", config.job_table.redacted())
        self.worker = SpoolWorker(
            self.core, self.spool, self.results, self.metrics.for_lane(config.model_name),
            config.triton_retry_backoff_s,
            jobs=jobs, sink=self.delivery, retention_s=config.job_retention_s,
            lease_s=config.job_lease_s,
            policy=GroupingPolicy.resolve(self.manifest, config.group_level,
                                          config.group_timeout_s))
        # One lane per served model (intake/models.py); the default model's is the gateway's
        # own spool, worker and results, as when it serves one model.
        self.lanes: list[ModelLane] = [ModelLane(self.manifest.name, self.core, self.spool,
                                                 self.results, self.worker)]
        for name, manifest in others.items():
            self.lanes.append(self._lane(manifest, (inferers or {}).get(name)))
        self._export_state_metrics()
        self.ingestor = Ingestor(self.core, self.spool, self.worker, self.metrics,
                                 config.max_spool_depth, config.max_request_bytes,
                                 config.min_free_bytes, returns=self.delivery,
                                 lanes=self.lanes)
        self.audit = AuditLog(config.audit_log, config.audit_syslog)
        self.model_versions = ModelVersions(
            self.lanes, self.version_store, self._make_core,
            None if self._injected else partial(load_versions, config.triton_grpc_url),
            self._version_changed, self.recorders, plan_for=self._plan_for,
            on_follow=self._version_followed)
        # a promotion or rollback made by another process of the pod or another replica
        self._follower = (VersionFollower(self.model_versions, self.version_store)
                          if self.model_versions.versioned else None)
        self.guard = Guard(
            KeyStore(config.api_keys) if config.api_keys is not None else None, self.audit,
            RateLimiter(config.rate_limit_per_s, config.rate_limit_burst, shared=pod),
            ConcurrencyCap(config.max_concurrent_requests), config.allowed_sources,
            self.metrics)
        cert_files = (CertFiles(config.tls_cert, config.tls_key, config.tls_ca)
                      if config.http_tls and config.tls_cert and config.tls_key else None)
        self.dimse = DicomServer(config, self.ingestor, self.metrics, audit=self.audit, pod=pod)
        self.oip = Dataplane(self.core, self.results, self.metrics, self.ready, self.lanes)
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
            extra_routes=[*models_edge.create_routes(self.model_versions, self.metrics),
                          *dicomweb.create_routes(self.ingestor, self.metrics,
                                                  config.max_request_bytes),
                          *oip_rest.create_routes(self.oip, self.metrics,
                                                  config.max_request_bytes)],
        )
        peers = PeerCertificates()
        self.connections = ConnectionGuard(
            ConnectionLimits(config.http_header_timeout_s, config.http_body_timeout_s,
                             config.max_connections_per_source),
            self.audit, self.metrics, error_response, pod=pod)
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
        self._http_thread = threading.Thread(target=self._serve_http, name="http", daemon=True)

    def _serve_http(self) -> None:
        if self.pod is None:
            self._http.run()
            return
        self._http.run(sockets=[reuse_port_socket(self.config.http_host,
                                                  self.config.http_port)])

    def _triton(self, manifest: Manifest, version: int | None = None) -> TritonInferer:
        config = self.config
        return TritonInferer(
            config.triton_grpc_url, manifest.name, manifest.input.name, manifest.output.name,
            config.triton_timeout_s,
            CircuitBreaker(config.triton_breaker_failures, config.triton_breaker_cooldown_s),
            version=version)

    def _make_core(self, manifest: Manifest, version: int) -> InferenceCore:
        """The core of one version: an injected inferer (``name@version``, or ``name`` for
        the manifest's version), else a Triton client pinned to that version."""
        name = manifest.name
        inferer = self._injected.get(f"{name}@{version}") or (
            self._injected.get(name) if version == manifest.version else None)
        return InferenceCore(dataclasses.replace(manifest, version=version),
                             inferer or self._triton(manifest, version))

    def _versioned(self, manifest: Manifest) -> VersionedCore:
        """A model's versions as one core, with its plan (saved primary, settings) and the
        recorder of its shadow's results (``<lane>/shadow/``)."""
        name = manifest.name
        self._manifest_versions[name] = manifest.version
        plan = self._plan_for(name, self._saved_versions.get(name, {}), manifest.version)
        root = lane_root(self.config.spool_dir, name, default=name == self.config.model_name)
        recorder = ShadowRecorder(manifest, ResultStore(root / "shadow"), self.metrics)
        self.recorders[name] = recorder
        if not self._injected and (len(plan.versions) > 1 or plan.previous is not None):
            try:
                load_versions(self.config.triton_grpc_url, name,
                              sorted(set(plan.versions) | {plan.previous or plan.primary}))
            except Unavailable as exc:  # Triton not in explicit mode: its own policy serves
                LOG.warning("model %s: versions not loaded through Triton's API (%s: %s)",
                            name, exc.reason, exc)
        cores = {v: self._make_core(manifest, v) for v in plan.versions}
        self._export_versions(name, plan, manifest)
        return VersionedCore(cores, plan, recorder)

    def _export_versions(self, name: str, plan: VersionPlan,
                         manifest: Manifest | None = None) -> None:
        if manifest is not None:
            budget = manifest.accuracy_budget
            self.metrics.accuracy_budget.labels(name, "min_agreement").set(budget.min_agreement)
            self.metrics.accuracy_budget.labels(name, "max_dice_drop").set(budget.max_dice_drop)
        for labels in self._version_labels.pop(name, []):
            # a pod's multiprocess files keep a removed series: it reads 0 there, not 1
            self.metrics.model_version.labels(*labels).set(0)
            if not self.metrics.multiprocess:
                self.metrics.model_version.remove(*labels)
        current = [(name, role, str(v)) for role, v in
                   (("primary", plan.primary), ("shadow", plan.shadow),
                    ("canary", plan.canary)) if v is not None]
        for labels in current:
            self.metrics.model_version.labels(*labels).set(1)
        self._version_labels[name] = current
        self.metrics.canary_share.labels(name).set(plan.share if plan.canary else 0.0)

    def _plan_for(self, name: str, saved: Mapping[str, int | None],
                  manifest_version: int | None = None) -> VersionPlan:
        if manifest_version is None:
            manifest_version = self._manifest_versions[name]
        shadow, canary, share = self._version_settings.get(name, (None, None, 0.0))
        return plan_from(saved, manifest_version, shadow, canary, share)

    def _version_followed(self, name: str, old: VersionPlan, new: VersionPlan) -> None:
        self._export_versions(name, new)

    def _version_changed(self, name: str, action: str, old: VersionPlan,
                         new: VersionPlan) -> None:
        self.audit.write("model_version", "rest", action, "ok", model=name,
                         from_version=old.primary, to_version=new.primary, plan=new.to_dict())
        self._export_versions(name, new)

    def _lane(self, manifest: Manifest, inferer: ServingInferer | None) -> ModelLane:
        """Another served model: its own core, spool folder, job table, results and worker,
        grouped by its own manifest (the gateway's grouping flags apply to the default model
        only), sharing the delivery outbox."""
        core = self._versioned(manifest)
        root = lane_root(self.config.spool_dir, manifest.name, default=False)
        spool, results = Spool(root), ResultStore(root)
        try:
            jobs = JobTable(root, self.config.job_table.for_model(manifest.name))
        except JobDbError as exc:
            raise ConfigError(str(exc)) from None
        worker = SpoolWorker(core, spool, results, self.metrics.for_lane(manifest.name),
                             self.config.triton_retry_backoff_s, jobs=jobs, sink=self.delivery,
                             retention_s=self.config.job_retention_s,
                             lease_s=self.config.job_lease_s,
                             policy=GroupingPolicy.resolve(manifest))
        return ModelLane(manifest.name, core, spool, results, worker)

    def _inferers(self) -> list[ServingInferer]:
        """The primary version's inferer of every model."""
        return [cast(ServingInferer, lane.core.inferer) for lane in self.lanes]

    def _all_inferers(self) -> list[ServingInferer]:
        found: list[ServingInferer] = []
        for lane in self.lanes:
            cores = (lane.core.cores.values() if isinstance(lane.core, VersionedCore)
                     else [lane.core])
            found.extend(cast(ServingInferer, c.inferer) for c in cores
                         if all(c.inferer is not f for f in found))
        return found

    def _jobs(self, state: str) -> int:
        return sum(lane.worker.jobs.count(state) for lane in self.lanes)

    def _export_state_metrics(self) -> None:
        """Job states (read from every model's job table at scrape time) and the breaker's
        state."""
        for state in JOB_STATES:
            self.metrics.jobs.labels(state).set_function(partial(self._jobs, state))
        if len(self.lanes) > 1:  # each model's worker sets these to its own: sum them instead
            self.metrics.spool_depth.set_function(
                lambda: sum(lane.worker.depth for lane in self.lanes))
            self.metrics.groups_open.set_function(
                lambda: sum(lane.worker.open_groups for lane in self.lanes))
        breaker = getattr(self.inferer, "breaker", None)
        if isinstance(breaker, CircuitBreaker):
            for state in BREAKER_STATES:
                self.metrics.triton_breaker.labels(state).set_function(
                    partial(_is_state, breaker, state))

    def _mark_delivered(self, names: Sequence[str]) -> None:
        """Spool names are unique across models: each lane marks the ones it holds."""
        for lane in self.lanes:
            lane.worker.jobs.mark_delivered(names)

    def ready(self) -> bool:
        return (self.dimse.listening and self._http.started
                and all(lane.worker.alive for lane in self.lanes)
                and (self.delivery is None or self.delivery.alive)
                and (self.grpc is None or self.grpc.listening)
                and all(inferer.ready() for inferer in self._inferers()))

    def _warm_up(self) -> None:
        """One zero-image inference per model: opens the gRPC channel and checks that Triton
        takes the manifest's input shape. Triton being down is not fatal: spooled work waits
        for it."""
        for lane, inferer in zip(self.lanes, self._inferers(), strict=True):
            try:
                inferer.infer(np.zeros((1, *lane.manifest.input.shape), dtype=np.float32))
            except Unavailable as exc:
                LOG.warning("warm-up inference of %s failed (%s); starting anyway", lane.name,
                            exc.reason)

    def start(self, timeout_s: float = 10.0) -> None:
        quiet_identifier_quoting_loggers()  # before anything builds or parses a data set
        self._warm_up()
        if self.delivery is not None:
            self.delivery.start()
        for lane in self.lanes:
            lane.worker.start()
        if self._follower is not None:
            self._follower.start()
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
        if self._follower is not None:
            self._follower.stop()
        for lane in self.lanes:
            lane.worker.stop()
        if self.delivery is not None:  # after the workers (no accept in flight), before jobs
            self.delivery.stop()
        for lane in self.lanes:
            lane.worker.jobs.close()
        for inferer in self._all_inferers():
            inferer.close()
        self.audit.close()
        if self.pod is not None:
            self.pod.close()
        LOG.info("gateway stopped")
