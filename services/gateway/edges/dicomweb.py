"""DICOMweb edge: STOW-RS (PS3.18 10.5) on ``/dicomweb/studies[/{study}]``.

Every part is checked and durably spooled (``Ingestor.accept``) before the response is sent;
inference follows in the worker, results appear at ``/v1/studies/{study}/results``. The
response is the Store Instances Response Module as ``application/dicom+json``:
ReferencedSOPSequence (0008,1199) for stored instances, FailedSOPSequence (0008,1198) with a
FailureReason (0008,1197) for the others. HTTP status: 200 all stored, 202 some stored,
409 none stored, or, when none was stored only because the gateway is out of resources, the
status table's answer for that (503 + Retry-After). Statuses and FailureReasons come from
``services.gateway.status``.

RetrieveURL is left out: this gateway keeps instances only until they are inferred and offers
no WADO-RS retrieve, so there is no URL to retrieve them from. A ``Link`` header points to the
study's results instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.edges import multipart
from services.gateway.edges.rest import read_body
from services.gateway.errors import (
    BadRequest,
    GatewayError,
    Unavailable,
    UnsupportedMediaType,
    WrongStudy,
)
from services.gateway.intake.ingest import Ingestor
from services.gateway.metrics import GatewayMetrics
from services.gateway.phi import uid_hash
from services.gateway.status import http_headers, http_status, stow_failure_reason

LOG = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
MAX_PARTS = 1000

def _request_error(exc: GatewayError) -> JSONResponse:
    """An error about the whole request (before any part is read); the status table says
    the status and Retry-After."""
    return JSONResponse({"error": {"reason": exc.reason, "message": str(exc)}},
                        status_code=http_status(exc),
                        headers=http_headers(exc) or None)


@dataclass
class _Outcome:
    stored: list[tuple[str, str, str]]  # (SOP class, SOP instance, study)
    failed: list[tuple[str, str, int]]  # (SOP class or "", SOP instance or "", reason)
    # failures because the gateway is out of resources right now (Unavailable)
    busy: list[GatewayError] = field(default_factory=list)


def _boundary(content_type: str) -> str:
    media, params = multipart.parse_media_type(content_type)
    if media != "multipart/related":
        raise UnsupportedMediaType(
            'Content-Type must be multipart/related; type="application/dicom"', "media_type")
    if params.get("type", DICOM).lower() != DICOM:
        raise UnsupportedMediaType(
            f"multipart/related type {params['type']!r} is not supported; only {DICOM}",
            "media_type")
    if "boundary" not in params:
        raise BadRequest("multipart/related without a boundary parameter", "bad_boundary")
    return multipart.check_boundary(params["boundary"])


def _uid(ds: Dataset | None, keyword: str) -> str:
    """A UID for the response, or "" when the part could not be read that far."""
    try:
        return str(ds.get(keyword, "")) if ds is not None else ""
    except Exception:  # a malformed raw element converts lazily and may raise
        return ""


def _item(sop_class: str, sop_instance: str) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    return item


def store_response(outcome: _Outcome) -> dict[str, Any]:
    """The Store Instances Response Module in the DICOM JSON model (PS3.18 F.2)."""
    body: dict[str, Any] = {}
    if outcome.failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {**_item(c, i), "00081197": {"vr": "US", "Value": [reason]}}
            for c, i, reason in outcome.failed]}
    if outcome.stored:
        body["00081199"] = {"vr": "SQ", "Value": [_item(c, i) for c, i, _ in outcome.stored]}
    return body


def create_routes(ingestor: Ingestor, metrics: GatewayMetrics,
                  max_request_bytes: int) -> list[Route]:
    def store_part(part: multipart.Part, target_study: str | None,
                   arrival: float) -> tuple[Dataset | None, GatewayError | None]:
        ds: Dataset | None = None
        try:
            if part.media_type not in ("", DICOM):
                raise UnsupportedMediaType(f"part of type {part.media_type!r}; expected {DICOM}",
                                           "media_type")
            ingestor.check_capacity()
            data, ds = ingestor.read(part.body)
            if target_study is not None and str(ds.StudyInstanceUID) != target_study:
                raise WrongStudy("instance belongs to another study than the request target",
                                 "wrong_study")
            # a result coming back about a de-identified study: re-identified, not inferred
            if not ingestor.take_returning(ds, "stow"):
                lanes = ingestor.check(ds)
                ingestor.accept(data, ds, "stow", arrival, time.perf_counter(), lanes=lanes)
            return ds, None
        except GatewayError as exc:
            return ds, exc

    def store_all(parts: list[multipart.Part], target_study: str | None,
                  arrival: float) -> _Outcome:
        outcome = _Outcome([], [])
        for part in parts:
            ds, exc = store_part(part, target_study, arrival)
            sop_class, sop_instance = _uid(ds, "SOPClassUID"), _uid(ds, "SOPInstanceUID")
            if exc is None and ds is not None:
                outcome.stored.append((sop_class, sop_instance, str(ds.StudyInstanceUID)))
                continue
            assert exc is not None
            reason = stow_failure_reason(exc)
            outcome.failed.append((sop_class, sop_instance, reason))
            if isinstance(exc, Unavailable):
                outcome.busy.append(exc)
            LOG.warning("STOW-RS part refused with 0x%04X: %s (instance %s)", reason,
                        exc.reason, uid_hash(sop_instance) if sop_instance else "unknown")
            metrics.requests.labels("stow", "refused", exc.reason).inc()
        return outcome

    async def stow(request: Request) -> Response:
        arrival = time.perf_counter()
        target = request.path_params.get("study_uid")
        try:
            boundary = _boundary(request.headers.get("content-type", ""))
            ingestor.check_capacity()  # refuse before reading a body we cannot take
            body = await read_body(request, max_request_bytes)
            parts = multipart.split(body, boundary, MAX_PARTS)
        except GatewayError as exc:
            LOG.warning("STOW-RS request refused: %s", exc.reason)
            metrics.requests.labels("stow", "refused", exc.reason).inc()
            return _request_error(exc)
        outcome = await run_in_threadpool(store_all, parts, target, arrival)
        # nothing stored and nothing wrong with the data: retry later, as the table says
        busy = (outcome.busy[0] if not outcome.stored and outcome.busy
                and len(outcome.busy) == len(outcome.failed) else None)
        headers: dict[str, str] = {}
        if outcome.stored:
            code = 202 if outcome.failed else 200
        elif busy is not None:
            code, headers = http_status(busy), http_headers(busy)
        else:
            code = 409
        studies = {study for _, _, study in outcome.stored}
        if len(studies) == 1:
            headers["Link"] = f'</v1/studies/{studies.pop()}/results>; rel="results"'
        return JSONResponse(store_response(outcome), status_code=code, headers=headers,
                            media_type=DICOM_JSON)

    return [
        Route("/dicomweb/studies", stow, methods=["POST"]),
        Route("/dicomweb/studies/{study_uid:str}", stow, methods=["POST"]),
    ]
