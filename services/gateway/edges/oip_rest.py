"""Open Inference Protocol v2 over HTTP/REST (KServe v2, Triton's HTTP API), for clinical apps
using tritonclient.http or any KServe v2 client. The signature is in oip.py.

The ``DICOM`` input must use the binary tensor data extension (tritonclient's default,
``binary_data=True``): DICOM files are binary and the JSON form of BYTES carries text only.
Outputs come back in JSON form, or binary where the request asks for it (``binary_data``
per output, or ``binary_data_output`` for all). Request bodies compressed with gzip or
deflate (tritonclient's ``request_compression_algorithm``) are accepted within the size limit.
Statuses come from ``services.gateway.status``; the body is ``{"error": "<message>"}`` as
tritonclient expects.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.edges import oip
from services.gateway.edges.rest import read_body
from services.gateway.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
)
from services.gateway.jsonbody import parse_json
from services.gateway.metrics import GatewayMetrics
from services.gateway.status import http_headers, http_status

LOG = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"

def error_response(exc: GatewayError) -> JSONResponse:
    """OIP's error body; status and Retry-After from the status table."""
    return JSONResponse({"error": str(exc)}, status_code=http_status(exc),
                        headers=http_headers(exc) or None)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding!r} not supported (gzip, deflate)",
                         "bad_encoding")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding}: {exc}", "bad_encoding") from exc
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request exceeds {limit} bytes", "too_large")
    return out


def _parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} does not fit the body", "bad_request")
        head, binary = body[:int(header_length)], body[int(header_length):]
    try:
        doc = parse_json(head, "inference request header", len(body))
    except GatewayError as exc:
        if exc.reason != "bad_json":
            raise
        raise BadRequest(str(exc), "bad_request") from exc
    if not isinstance(doc, dict):
        raise BadRequest("inference request must be a JSON object", "bad_request")
    return doc, binary


def _input_files(dataplane: oip.Dataplane, doc: dict[str, Any], binary: bytes) -> list[bytes]:
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"expected exactly one input, {oip.INPUT!r}", "bad_tensor")
    tensor = inputs[0]
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise BadRequest("input shape must be a list of integers", "bad_tensor")
    count = dataplane.check_input(str(tensor.get("name")), str(tensor.get("datatype")), shape)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is None:
        raise BadRequest(f"send {oip.INPUT} with the binary tensor data extension "
                         "(tritonclient: set_data_from_numpy(..., binary_data=True))",
                         "json_bytes_input")
    if not isinstance(size, int) or size < 0 or size != len(binary):
        raise BadRequest("binary_data_size does not match the binary data sent", "bad_tensor")
    return oip.decode_bytes_tensor(binary, count)


def _requested(doc: dict[str, Any]) -> tuple[list[str] | None, dict[str, bool]]:
    default_binary = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    outputs = doc.get("outputs")
    if outputs is None:
        return None, {oip.SCORES: default_binary, oip.FINDINGS: default_binary}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadRequest("outputs must be a list of objects", "bad_output")
    names = [str(o.get("name")) for o in outputs]
    binary = {str(o.get("name")): bool((o.get("parameters") or {}).get("binary_data",
                                                                         default_binary))
              for o in outputs}
    return names, binary


def create_routes(dataplane: oip.Dataplane, metrics: GatewayMetrics,
                  max_request_bytes: int) -> list[Route]:
    def refused(exc: GatewayError) -> JSONResponse:
        LOG.warning("OIP REST request refused: %s", exc.reason)
        metrics.requests.labels("oip_rest", "refused", exc.reason).inc()
        return error_response(exc)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": dataplane.server_live()})

    async def ready(request: Request) -> Response:
        ok = await run_in_threadpool(dataplane.server_ready)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(dataplane.server_metadata())

    async def model_metadata(request: Request) -> Response:
        try:
            return JSONResponse(dataplane.model_metadata(
                request.path_params["model"], request.path_params.get("version", "")))
        except GatewayError as exc:
            return refused(exc)

    async def model_ready(request: Request) -> Response:
        try:
            ok = await run_in_threadpool(dataplane.model_ready, request.path_params["model"],
                                         request.path_params.get("version", ""))
        except GatewayError as exc:
            return refused(exc)
        return JSONResponse({"name": request.path_params["model"], "ready": ok},
                            status_code=200 if ok else 503)

    async def infer(request: Request) -> Response:
        arrival = time.perf_counter()
        model = request.path_params["model"]
        version = request.path_params.get("version", "")
        try:
            body = _decompress(await read_body(request, max_request_bytes),
                               request.headers.get("content-encoding", "").strip().lower(),
                               max_request_bytes)
            doc, binary = _parse_request(body, request.headers.get(HEADER_LENGTH))
            dataplane.model_metadata(model, version)  # unknown model: 404 before anything
            files = _input_files(dataplane, doc, binary)
            names, want_binary = _requested(doc)
            outputs = await run_in_threadpool(dataplane.infer, model, version, files,
                                              "oip_rest", arrival, names)
        except GatewayError as exc:
            return refused(exc)
        metrics.requests.labels("oip_rest", "inferred", "ok").inc(len(files))
        head: dict[str, Any] = {"model_name": model,
                                "model_version": dataplane.version_of(model), "outputs": []}
        if "id" in doc:
            head["id"] = doc["id"]
        blobs = []
        for out in outputs:
            entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                                     "shape": out.shape}
            if want_binary.get(out.name, False):
                entry["parameters"] = {"binary_data_size": len(out.raw)}
                blobs.append(out.raw)
            else:
                entry["data"] = out.json_data
            head["outputs"].append(entry)
        if not blobs:
            return JSONResponse(head)
        header = json.dumps(head).encode("utf-8")
        return Response(header + b"".join(blobs), media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})

    async def models(request: Request) -> Response:
        index = await run_in_threadpool(dataplane.repository_index)
        return JSONResponse({"models": index})

    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models", models, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{model:str}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model:str}/versions/{version:str}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model:str}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model:str}/versions/{version:str}/ready", model_ready,
              methods=["GET"]),
        Route("/v2/models/{model:str}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model:str}/versions/{version:str}/infer", infer, methods=["POST"]),
    ]
