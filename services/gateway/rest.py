"""REST edge: infer on a DICOM file, fetch a study's results, health, readiness, metrics.

Gateway errors map to HTTP statuses in one table; error bodies are
``{"error": {"reason": ..., "message": ...}}`` and never carry patient data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.core import InferenceCore, Result, complete_timings, parse
from services.gateway.errors import (
    GatewayError,
    InferenceFailed,
    InvalidInstance,
    MissingPixelData,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UnsupportedInstance,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.spool import ResultStore

LOG = logging.getLogger(__name__)
DICOM_MEDIA_TYPE = "application/dicom"

HTTP_STATUS: tuple[tuple[type[GatewayError], int], ...] = (
    (InvalidInstance, 400),
    (MissingPixelData, 400),
    (UnsupportedInstance, 400),
    (PayloadTooLarge, 413),
    (NotFound, 404),
    (Unavailable, 503),
    (InferenceFailed, 502),
    (GatewayError, 400),
)


def error_response(exc: GatewayError) -> JSONResponse:
    status = next(code for cls, code in HTTP_STATUS if isinstance(exc, cls))
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse({"error": {"reason": exc.reason, "message": str(exc)}},
                        status_code=status, headers=headers)


def create_app(core: InferenceCore, results: ResultStore, metrics: GatewayMetrics,
               ready: Callable[[], bool], max_request_bytes: int) -> Starlette:
    model = core.manifest.name

    def infer_bytes(data: bytes, arrival: float) -> Result:
        ds = parse(data)
        received = time.perf_counter()
        result = core.analyze(ds, {"receive": (received - arrival) * 1000.0})
        complete_timings(result.timings_ms, arrival, time.perf_counter())
        results.save(result.study_instance_uid, result.sop_instance_uid, result.to_dict())
        return result

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise PayloadTooLarge(f"request of {declared} bytes exceeds {max_request_bytes}",
                                  "too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise PayloadTooLarge(f"request exceeds {max_request_bytes} bytes", "too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(request: Request) -> Response:
        arrival = time.perf_counter()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != DICOM_MEDIA_TYPE:
            metrics.requests.labels("rest", "refused", "media_type").inc()
            return JSONResponse(
                {"error": {"reason": "media_type",
                           "message": f"Content-Type must be {DICOM_MEDIA_TYPE}"}},
                status_code=415)
        try:
            body = await read_body(request)
            if not body:
                raise InvalidInstance("empty request body", "empty")
            result = await run_in_threadpool(infer_bytes, body, arrival)
        except GatewayError as exc:
            LOG.warning("REST infer refused: %s", exc.reason)
            metrics.requests.labels("rest", "refused", exc.reason).inc()
            return error_response(exc)
        payload = result.to_dict()
        metrics.observe(model, "rest", result.timings_ms)
        metrics.requests.labels("rest", "inferred", "ok").inc()
        return JSONResponse(payload)

    async def study_results(request: Request) -> Response:
        study_uid = request.path_params["study_uid"]
        found = await run_in_threadpool(results.for_study, study_uid)
        if not found:
            return error_response(NotFound("no results for that study (yet)", "not_found"))
        return JSONResponse({"study_instance_uid": study_uid, "instances": found})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        ok = await run_in_threadpool(ready)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def internal_error(request: Request, exc: Exception) -> Response:
        LOG.error("unexpected %s serving %s", type(exc).__name__, request.url.path)
        metrics.requests.labels("rest", "failed", "internal").inc()
        return JSONResponse({"error": {"reason": "internal", "message": "internal error"}},
                            status_code=500)

    return Starlette(exception_handlers={Exception: internal_error}, routes=[
        Route("/v1/infer", infer, methods=["POST"]),
        Route("/v1/studies/{study_uid:str}/results", study_results, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ])
