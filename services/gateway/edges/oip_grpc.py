"""Open Inference Protocol v2 over gRPC (Triton's ``inference.GRPCInferenceService``), for
clinical apps using tritonclient.grpc or any KServe v2 gRPC client. The signature is in oip.py.

The ``DICOM`` input may come as ``raw_input_contents`` (tritonclient's default) or as
``contents.bytes_contents``; outputs always go back as ``raw_output_contents``. Messages are
bounded by the gateway's request size limit (gRPC answers RESOURCE_EXHAUSTED beyond it).
gRPC status codes come from ``services.gateway.status``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent import futures

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from services.errors import ServiceError
from services.gateway.edges import oip
from services.gateway.errors import (
    BadRequest,
    GatewayError,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.status import grpc_code

LOG = logging.getLogger(__name__)

class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The OIP v2 methods this gateway offers; the rest answer UNIMPLEMENTED (the base class)."""

    def __init__(self, dataplane: oip.Dataplane, metrics: GatewayMetrics) -> None:
        self._dp = dataplane
        self._metrics = metrics

    def _abort(self, context: grpc.ServicerContext, exc: GatewayError) -> None:
        LOG.warning("OIP gRPC request refused: %s", exc.reason)
        self._metrics.requests.labels("oip_grpc", "refused", exc.reason).inc()
        context.abort(grpc_code(exc), str(exc))

    def ServerLive(self, request: pb.ServerLiveRequest,  # noqa: N802 (gRPC's names)
                   context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._dp.server_live())

    def ServerReady(self, request: pb.ServerReadyRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dp.server_ready())

    def ServerMetadata(self, request: pb.ServerMetadataRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        meta = self._dp.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                         extensions=meta["extensions"])

    def ModelReady(self, request: pb.ModelReadyRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        try:
            return pb.ModelReadyResponse(ready=self._dp.model_ready(request.name,
                                                                    request.version))
        except GatewayError as exc:
            self._abort(context, exc)
            raise  # abort raised already; keeps type checkers aware

    def ModelMetadata(self, request: pb.ModelMetadataRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            meta = self._dp.model_metadata(request.name, request.version)
        except GatewayError as exc:
            self._abort(context, exc)
            raise
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    def _files(self, request: pb.ModelInferRequest) -> list[bytes]:
        if len(request.inputs) != 1:
            raise BadRequest(f"expected exactly one input, {oip.INPUT!r}", "bad_tensor")
        tensor = request.inputs[0]
        count = self._dp.check_input(tensor.name, tensor.datatype, list(tensor.shape))
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise BadRequest("raw_input_contents must hold exactly one tensor",
                                 "bad_tensor")
            return oip.decode_bytes_tensor(request.raw_input_contents[0], count)
        files = list(tensor.contents.bytes_contents)
        if len(files) != count:
            raise BadRequest(f"bytes_contents holds {len(files)} elements, shape says {count}",
                             "bad_tensor")
        return files

    def ModelInfer(self, request: pb.ModelInferRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> pb.ModelInferResponse:
        arrival = time.perf_counter()
        try:
            self._dp.model_metadata(request.model_name, request.model_version)
            files = self._files(request)
            names = [o.name for o in request.outputs] or None
            outputs = self._dp.infer(request.model_name, request.model_version, files,
                                     "oip_grpc", arrival, names)
        except GatewayError as exc:
            self._abort(context, exc)
            raise
        self._metrics.requests.labels("oip_grpc", "inferred", "ok").inc(len(files))
        return pb.ModelInferResponse(
            model_name=request.model_name,
            model_version=self._dp.version_of(request.model_name), id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(
                name=o.name, datatype=o.datatype, shape=o.shape) for o in outputs],
            raw_output_contents=[o.raw for o in outputs])


class OipGrpcServer:
    def __init__(self, dataplane: oip.Dataplane, metrics: GatewayMetrics, host: str,
                 port: int, max_message_bytes: int, workers: int = 4,
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None,
                 handshake_timeout_s: float | None = None) -> None:
        """``interceptors``: the guard (authentication, limits, audit); ``credentials``:
        TLS (tls.ReloadingGrpcCredentials), None for a plain-text listener;
        ``handshake_timeout_s``: a connection that has not finished its TLS handshake and sent
        its HTTP/2 preface and settings by then gets GOAWAY and is closed (gRPC's default is
        120 s), the gRPC counterpart of the HTTP header timeout."""
        self._address = f"{host}:{port}"
        self._credentials = credentials
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
        if handshake_timeout_s is not None:
            options.append(("grpc.server_handshake_timeout_ms",
                            max(1, round(handshake_timeout_s * 1000))))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oip-grpc"),
            interceptors=list(interceptors), options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(dataplane, metrics), self._server)
        self.listening = False

    def start(self) -> None:
        try:
            bound = (self._server.add_secure_port(self._address, self._credentials)
                     if self._credentials is not None
                     else self._server.add_insecure_port(self._address))
        except RuntimeError as exc:
            raise ServiceError(f"cannot listen for gRPC on {self._address}: {exc}") from exc
        if not bound:
            raise ServiceError(f"cannot listen for gRPC on {self._address}")
        self._server.start()
        self.listening = True
        LOG.info("OIP v2 gRPC listening on %s (%s)", self._address,
                 "TLS" if self._credentials is not None else "plain text")

    def stop(self, grace_s: float = 5.0) -> None:
        if self.listening:
            self._server.stop(grace_s).wait()
            self.listening = False
