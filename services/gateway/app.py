"""The gateway process: wires config, core, spool, worker and the DIMSE and REST edges."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import uvicorn

from optimizer.manifest import Manifest
from services.errors import ConfigError, ServiceError
from services.gateway.config import GatewayConfig
from services.gateway.core import InferenceCore, read_leniently
from services.gateway.dimse import DicomServer
from services.gateway.errors import Unavailable
from services.gateway.metrics import GatewayMetrics
from services.gateway.rest import create_app
from services.gateway.spool import ResultStore, Spool
from services.gateway.triton import TritonInferer
from services.gateway.worker import SpoolWorker

LOG = logging.getLogger(__name__)


class Gateway:
    """Start with ``start()``; ``stop()`` closes listeners first, then drains the worker."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.manifest = Manifest.load(config.manifest_path)
        if self.manifest.name != config.model_name:
            raise ConfigError(f"manifest names model {self.manifest.name!r}, "
                              f"configured model is {config.model_name!r}")
        read_leniently()
        self.metrics = GatewayMetrics()
        self.inferer = TritonInferer(
            config.triton_grpc_url, config.model_name, self.manifest.input.name,
            self.manifest.output.name, config.triton_timeout_s,
        )
        self.core = InferenceCore(self.manifest, self.inferer)
        self.spool = Spool(config.spool_dir)
        self.results = ResultStore(config.spool_dir)
        self.worker = SpoolWorker(self.core, self.spool, self.results, self.metrics,
                                  config.triton_retry_backoff_s)
        self.dimse = DicomServer(config, self.core, self.spool, self.worker, self.metrics)
        app = create_app(self.core, self.results, self.metrics, self.ready,
                         config.max_request_bytes)
        self._http = uvicorn.Server(uvicorn.Config(
            app, host=config.http_host, port=config.http_port, log_level="warning",
            access_log=False, lifespan="off",
        ))
        self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)

    def ready(self) -> bool:
        return (self.dimse.listening and self._http.started and self.worker.alive
                and self.inferer.ready())

    def _warm_up(self) -> None:
        """One zero-image inference: opens the gRPC channel and checks that Triton takes the
        manifest's input shape. Triton being down is not fatal: spooled work waits for it."""
        try:
            self.inferer.infer(np.zeros((1, *self.manifest.input.shape), dtype=np.float32))
        except Unavailable as exc:
            LOG.warning("warm-up inference failed (%s); starting anyway", exc.reason)

    def start(self, timeout_s: float = 10.0) -> None:
        self._warm_up()
        self.worker.start()
        self.dimse.start()
        self._http_thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._http.started:
            if time.monotonic() > deadline or not self._http_thread.is_alive():
                self.stop()
                raise ServiceError(f"HTTP listener did not start on port {self.config.http_port}")
            time.sleep(0.02)
        LOG.info("gateway ready: http %s:%d, dicom %s:%d", self.config.http_host,
                 self.config.http_port, self.config.dicom_host, self.config.dicom_port)

    def stop(self) -> None:
        self.dimse.stop()
        self._http.should_exit = True
        if self._http_thread.is_alive():
            self._http_thread.join(timeout=10)
        self.worker.stop()
        self.inferer.close()
        LOG.info("gateway stopped")
