"""Liveness, readiness (no key needed) and Prometheus metrics (admin key).

Metrics count every tenant's requests and tokens together: figures for the operator, whose admin
keys act on every tenant. An auditor reads one tenant's records, so it does not get them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from steward.gateway.errors import APIError, json_response
from steward.gateway.service import Gateway

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return json_response(200, {"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    gw: Gateway | None = getattr(request.app.state, "gateway", None)
    if gw is None or not gw.ready:
        return json_response(503, {"status": "starting"})
    # Status only: which models a key may use is /v1/models' business (it filters by the key).
    return json_response(200, {"status": "ready"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    p = await gw.principal(request)
    if p.role != "admin":
        raise APIError(403, "metrics need an admin key", code="role_not_allowed")
    return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")
