"""Admin API: keys and tenants. Admin keys only; every act is traced (and audited, issue 5)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from steward.gateway.errors import APIError
from steward.gateway.keys import Principal, UnknownKeyError
from steward.gateway.schemas import KeyCreate, TenantUpdate
from steward.gateway.service import Gateway
from steward.gateway.trace import Trace

router = APIRouter(prefix="/admin")


MAX_KEY_LIFETIME_S = 10 * 365 * 24 * 3600


async def _admin(request: Request, trace: Trace) -> tuple[Gateway, Principal]:
    gw: Gateway = request.app.state.gateway
    p = await gw.principal(request, trace)
    if p.role != "admin":
        raise APIError(403, "this route needs an admin key", code="role_not_allowed")
    return gw, p


async def _act(request: Request, action: str, fn: Any) -> Response:
    gw: Gateway = request.app.state.gateway
    state = request.scope.get("state", {})
    # The route's template ("PUT /admin/tenants/{tenant_id}"), never the raw path: the trace is
    # recorded before the key is checked, so a raw path would let anyone write text into the
    # permanent audit log and a new metrics series per request. The target goes in `extra` once the
    # admin is known.
    template = getattr(request.scope.get("route"), "path", None) or "/admin/{unknown}"
    trace = Trace(request_id=state.get("request_id", ""), route=f"{request.method} {template}")
    trace.usage = {"admin_action": action}

    async def work() -> tuple[int, Any]:
        gw_, p = await _admin(request, trace)
        result: tuple[int, Any] = await fn(gw_, p, trace)
        return result

    return await gw.traced(trace, work)


@router.post(
    "/keys",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/KeyCreate"}}},
        }
    },
)
async def create_key(request: Request) -> Response:
    async def go(gw: Gateway, _p: Principal, trace: Trace) -> tuple[int, Any]:
        spec: KeyCreate = gw.parse(KeyCreate, await request.body())
        if spec.expires_in_s is not None and spec.expires_in_s > MAX_KEY_LIFETIME_S:
            raise APIError(
                400,
                f"expires_in_s must be at most {MAX_KEY_LIFETIME_S} (ten years); omit it for a key that "
                "does not expire",
                param="expires_in_s",
                code="invalid_value",
            )
        trace.extra["target_tenant"] = spec.tenant
        try:
            key, rec = await asyncio.to_thread(
                gw.keys.create,
                spec.tenant,
                spec.role,
                name=spec.name,
                models=spec.models,
                expires_in_s=spec.expires_in_s,
                limits=[lim.model_dump(exclude_none=True) for lim in spec.limits],
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param="tenant", code="invalid_value") from None
        trace.extra["target"] = rec.id
        return 201, {**rec.public(), "key": key}

    return await _act(request, "key.create", go)


@router.get("/keys")
async def list_keys(request: Request, tenant: str | None = None) -> Response:
    async def go(gw: Gateway, _p: Principal, trace: Trace) -> tuple[int, Any]:
        if tenant is not None:
            trace.extra["target_tenant"] = tenant[:64]
        recs = await asyncio.to_thread(gw.keys.list, tenant)
        return 200, {"object": "list", "data": [r.public() for r in recs]}

    return await _act(request, "key.list", go)


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> Response:
    async def go(gw: Gateway, _p: Principal, trace: Trace) -> tuple[int, Any]:
        try:
            rec = await asyncio.to_thread(gw.keys.revoke, key_id)
        except UnknownKeyError as exc:
            raise APIError(404, str(exc), code="key_not_found") from None
        trace.extra["target"] = rec.id
        trace.extra["target_tenant"] = rec.tenant
        return 200, rec.public()

    return await _act(request, "key.revoke", go)


@router.get("/tenants")
async def list_tenants(request: Request) -> Response:
    async def go(gw: Gateway, _p: Principal, trace: Trace) -> tuple[int, Any]:
        return 200, {"object": "list", "data": await asyncio.to_thread(gw.keys.list_tenants)}

    return await _act(request, "tenant.list", go)


@router.put(
    "/tenants/{tenant_id}",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TenantUpdate"}}},
        }
    },
)
async def update_tenant(tenant_id: str, request: Request) -> Response:
    async def go(gw: Gateway, _p: Principal, trace: Trace) -> tuple[int, Any]:
        spec: TenantUpdate = gw.parse(TenantUpdate, await request.body())
        if spec.policy and gw.guard is not None and spec.policy not in gw.guard.policy_names():
            # Caught here, not at the tenant's next request (which would then fail closed).
            known = ", ".join(gw.guard.policy_names())
            raise APIError(
                400,
                f"unknown guard policy {spec.policy!r}; known: {known}",
                param="policy",
                code="invalid_value",
            )
        try:
            out = await asyncio.to_thread(
                gw.keys.set_tenant,
                tenant_id,
                limits=[lim.model_dump(exclude_none=True) for lim in spec.limits]
                if spec.limits is not None
                else None,
                policy=spec.policy,
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param="tenant", code="invalid_value") from None
        trace.extra["target"] = tenant_id
        trace.extra["target_tenant"] = tenant_id
        return 200, out

    return await _act(request, "tenant.update", go)
