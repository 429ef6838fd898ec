"""Liveness, readiness (no key needed) and Prometheus metrics (admin key).

Metrics count every tenant's requests and tokens together: figures for the operator, whose admin
keys act on every tenant. An auditor reads one tenant's records, so it does not get them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from steward.gateway.errors import APIError, json_response
from steward.gateway.service import Gateway
from steward.gateway.trace import Trace

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
    """Every tenant's volume: an admin read like `GET /admin/tenants`, so it is traced (audited)
    like one, its refusals (401, 403) included."""
    gw: Gateway = request.app.state.gateway
    state = request.scope.get("state", {})
    trace = Trace(request_id=state.get("request_id", ""), route="GET /metrics")
    trace.usage = {"admin_action": "metrics.read"}
    body: list[bytes] = []

    async def work() -> tuple[int, Any]:
        p = await gw.principal(request, trace)
        if p.role != "admin":
            raise APIError(403, "metrics need an admin key", code="role_not_allowed")
        body.append(gw.metrics.render())
        return 200, None

    # `traced` answers in JSON; only its status is kept for the exposition format. The figures are
    # rendered before the read is recorded, so this read is counted in the next scrape.
    resp = await gw.traced(trace, work)
    if resp.status_code != 200 or not body:
        return resp
    return Response(body[0], media_type="text/plain; version=0.0.4")
