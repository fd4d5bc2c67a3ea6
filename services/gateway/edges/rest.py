"""REST edge: infer on a DICOM file, submit a study (JSON API), fetch a study's results and
status, health, readiness, metrics. The DICOMweb and Open Inference Protocol routes live in their
own modules (dicomweb.py, oip_rest.py) and are mounted on the same app.

Statuses come from ``services.gateway.status``; this edge owns only its error body,
``{"error": {"reason": ..., "message": ...}}``, which never carries patient data, and the
``WWW-Authenticate`` challenge that goes with a 401.

JSON study API: ``POST /v1/studies`` with ``{"instances": ["<base64 DICOM Part-10>", ...]}``
(one study). Every instance is checked first; if any is refused nothing is spooled and the
answer says which one (by index) and why. Otherwise all are durably spooled and the answer is
``202 {"study_instance_uid", "accepted", "results_url"}``. ``GET /v1/studies/{uid}/results``
answers ``status`` ``pending`` (instances still queued) or ``done``, with the results so far.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydicom.dataset import Dataset
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from services.gateway.dicom.parsing import parse
from services.gateway.errors import (
    BadRequest,
    GatewayError,
    InvalidInstance,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    UnsupportedMediaType,
)
from services.gateway.inference.core import InferenceCore, Result, complete_timings
from services.gateway.intake.ingest import Ingestor, with_preamble
from services.gateway.jsonbody import parse_json
from services.gateway.metrics import GatewayMetrics
from services.gateway.status import http_headers, http_status
from services.gateway.store.results import ResultStore

LOG = logging.getLogger(__name__)
DICOM_MEDIA_TYPE = "application/dicom"
MAX_STUDY_INSTANCES = 1000

def error_response(exc: GatewayError) -> JSONResponse:
    """The REST edge's error body; status and Retry-After from the status table."""
    headers = http_headers(exc)
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="bedside"'
    return JSONResponse({"error": {"reason": exc.reason, "message": str(exc)}},
                        status_code=http_status(exc), headers=headers or None)


async def read_body(request: Request, max_request_bytes: int) -> bytes:
    """The request body, refused with PayloadTooLarge as soon as it exceeds the limit, and
    with BadRequest (``incomplete_body``) when the connection closed before its end (the client
    went away, or paused longer than the body timeout: security/connections.py)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
        raise PayloadTooLarge(f"request of {declared} bytes exceeds {max_request_bytes}",
                              "too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise PayloadTooLarge(f"request exceeds {max_request_bytes} bytes",
                                      "too_large")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise BadRequest("the connection closed before the whole request body arrived",
                         "incomplete_body") from exc
    return b"".join(chunks)


def _decode_study_request(body: bytes, max_request_bytes: int) -> list[bytes]:
    doc = parse_json(body, "body", max_request_bytes)
    instances = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(instances, list) or not instances:
        raise BadRequest('expected {"instances": ["<base64 DICOM>", ...]} with at least one',
                         "bad_json")
    if len(instances) > MAX_STUDY_INSTANCES:
        raise PayloadTooLarge(f"more than {MAX_STUDY_INSTANCES} instances in one request",
                              "too_many_instances")
    decoded = []
    for k, item in enumerate(instances):
        if not isinstance(item, str):
            raise BadRequest(f"instances[{k}] is not a base64 string", "bad_json")
        try:
            decoded.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"instances[{k}] is not valid base64", "bad_base64") from exc
    return decoded


def create_app(core: InferenceCore, results: ResultStore, metrics: GatewayMetrics,
               ready: Callable[[], bool], max_request_bytes: int,
               ingestor: Ingestor | None = None,
               extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """Without an ``ingestor`` the app only infers synchronously (``/v1/infer``): there is no
    ``POST /v1/studies``, and a study's status is ``done`` as soon as it has results. With
    an ingestor serving several models, ``/v1/infer?model=NAME`` picks one (default: the
    default model) and a study's results are every model's."""
    lanes = {lane.name: (lane.core, lane.results)
             for lane in (ingestor.lanes if ingestor is not None else ())}
    lanes.setdefault(core.manifest.name, (core, results))

    def infer_bytes(data: bytes, arrival: float, model: str) -> Result:
        chosen, store = lanes[model]
        ds = parse(with_preamble(data))
        received = time.perf_counter()
        result = chosen.analyze(ds, {"receive": (received - arrival) * 1000.0})
        complete_timings(result.timings_ms, arrival, time.perf_counter())
        store.save(result.study_instance_uid, result.sop_instance_uid, result.to_dict())
        return result

    def study_documents(study_uid: str) -> list[dict[str, object]]:
        found: list[dict[str, object]] = []
        for _, store in lanes.values():
            found.extend(store.for_study(study_uid))
        return found

    async def infer(request: Request) -> Response:
        arrival = time.perf_counter()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        model = request.query_params.get("model", core.manifest.name)
        try:
            if model not in lanes:
                raise NotFound(f"unknown model {model[:64]!r}; this gateway serves "
                               f"{', '.join(sorted(lanes))}", "unknown_model")
            if media != DICOM_MEDIA_TYPE:
                raise UnsupportedMediaType(f"Content-Type must be {DICOM_MEDIA_TYPE}",
                                           "media_type")
            body = await read_body(request, max_request_bytes)
            if not body:
                raise InvalidInstance("empty request body", "empty")
            result = await run_in_threadpool(infer_bytes, body, arrival, model)
        except GatewayError as exc:
            LOG.warning("REST infer refused: %s", exc.reason)
            metrics.requests.labels("rest", "refused", exc.reason).inc()
            return error_response(exc)
        payload = result.to_dict()
        metrics.observe(model, "rest", result.timings_ms)
        metrics.requests.labels("rest", "inferred", "ok").inc()
        return JSONResponse(payload)

    def check_study(blobs: list[bytes]) -> list[tuple[bytes, Dataset]]:
        assert ingestor is not None  # the route exists only with an ingestor
        checked = []
        for k, data in enumerate(blobs):
            try:
                checked.append(ingestor.parse_and_check(data))
            except GatewayError as exc:
                raise type(exc)(f"instances[{k}]: {exc}", exc.reason) from exc
        studies = {str(ds.StudyInstanceUID) for _, ds in checked}
        if len(studies) > 1:
            raise BadRequest(f"instances of {len(studies)} studies; send one study per request",
                             "several_studies")
        return checked

    def spool_study(checked: list[tuple[bytes, Dataset]], arrival: float) -> None:
        assert ingestor is not None
        received = time.perf_counter()
        for data, ds in checked:
            ingestor.accept(data, ds, "rest", arrival, received)

    async def submit_study(request: Request) -> Response:
        arrival = time.perf_counter()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        assert ingestor is not None
        try:
            if media != "application/json":
                raise UnsupportedMediaType("Content-Type must be application/json",
                                           "media_type")
            ingestor.check_capacity()
            body = await read_body(request, max_request_bytes)
            blobs = _decode_study_request(body, max_request_bytes)
            checked = await run_in_threadpool(check_study, blobs)
            await run_in_threadpool(spool_study, checked, arrival)
        except GatewayError as exc:
            LOG.warning("study submission refused: %s", exc.reason)
            metrics.requests.labels("rest", "refused", exc.reason).inc()
            return error_response(exc)
        study_uid = str(checked[0][1].StudyInstanceUID)
        url = f"/v1/studies/{study_uid}/results"
        return JSONResponse({"study_instance_uid": study_uid, "accepted": len(checked),
                             "results_url": url}, status_code=202, headers={"Location": url})

    async def study_results(request: Request) -> Response:
        study_uid = request.path_params["study_uid"]
        pending = (await run_in_threadpool(ingestor.pending, study_uid)
                   if ingestor is not None else 0)
        found = await run_in_threadpool(study_documents, study_uid)
        if not found and not pending:
            return error_response(NotFound("no results for that study (yet)", "not_found"))
        return JSONResponse({"study_instance_uid": study_uid,
                             "status": "pending" if pending else "done",
                             "pending": pending, "instances": found})

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

    submit = [Route("/v1/studies", submit_study, methods=["POST"])] if ingestor is not None else []
    return Starlette(exception_handlers={Exception: internal_error}, routes=[
        Route("/v1/infer", infer, methods=["POST"]),
        *submit,
        Route("/v1/studies/{study_uid:str}/results", study_results, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *extra_routes,
    ])
