"""Model versions over HTTP: ``GET /v1/models`` (every served model: its versions, canary
share, accuracy budget, agreement of its shadow so far), ``POST /v1/models/{name}/promote``
(body ``{"version": N}`` optional: default the canary, else the shadow) and
``POST /v1/models/{name}/rollback``. Changes need the ``models`` scope (security/guard.py) and
are written to the audit trail; ``bedside models`` is their command-line client."""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.edges.rest import error_response, read_body
from services.gateway.errors import BadRequest, GatewayError, NotFound
from services.gateway.intake.models import ModelVersions
from services.gateway.jsonbody import parse_json
from services.gateway.metrics import GatewayMetrics

LOG = logging.getLogger(__name__)
MAX_BODY = 4096
ACTIONS = ("promote", "rollback")


def create_routes(versions: ModelVersions, metrics: GatewayMetrics) -> list[Route]:
    async def status(request: Request) -> Response:
        return JSONResponse({"models": await run_in_threadpool(versions.status)})

    async def change(request: Request) -> Response:
        name = request.path_params["model"]
        action = request.path_params["action"]
        if action not in ACTIONS:  # exactly these: anything else changes nothing
            exc = NotFound("unknown model action; expected promote or rollback",
                           "unknown_action")
            LOG.warning("model change refused: %s", exc.reason)
            metrics.requests.labels("rest", "refused", exc.reason).inc()
            return error_response(exc)
        try:
            body = await read_body(request, MAX_BODY)
            doc = parse_json(body, "body", MAX_BODY) if body.strip() else {}
            version = doc.get("version") if isinstance(doc, dict) else None
            if version is not None and (isinstance(version, bool)
                                        or not isinstance(version, int) or version < 1):
                raise BadRequest('expected {"version": N} with N >= 1, or no body',
                                 "bad_json")
            if action == "promote":
                plan = await run_in_threadpool(versions.promote, name, version)
            else:
                if version is not None:
                    raise BadRequest("rollback takes no version", "bad_json")
                plan = await run_in_threadpool(versions.rollback, name)
        except GatewayError as exc:
            LOG.warning("model %s refused: %s", action, exc.reason)
            metrics.requests.labels("rest", "refused", exc.reason).inc()
            return error_response(exc)
        return JSONResponse({"name": name, "action": action, **plan.to_dict()})

    return [
        Route("/v1/models", status, methods=["GET"]),
        Route("/v1/models/{model:str}/{action:str}", change, methods=["POST"]),
    ]
