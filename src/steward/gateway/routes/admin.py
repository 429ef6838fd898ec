"""Admin API: keys and tenants. Admin keys only; every act is traced (and audited, issue 5)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from steward.gateway.errors import APIError
from steward.gateway.keys import TENANT_RE, Principal, UnknownKeyError
from steward.gateway.schemas import KeyCreate, TenantUpdate
from steward.gateway.service import Gateway
from steward.gateway.trace import Trace

router = APIRouter(prefix="/admin")
log = logging.getLogger("steward.gateway")


MAX_KEY_LIFETIME_S = 10 * 365 * 24 * 3600
# A key's allow-list: each name at most as long as a request's `model` may be (a longer one could
# never match), and a bounded number of them. `steward keys create` checks the same bounds
# (commands/keys.py; tests/gateway/test_gateway_admin.py keeps them equal).
MAX_MODEL_CHARS = 256
MAX_KEY_MODELS = 256


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

    resp = await gw.traced(trace, work)
    created = trace.extra.get("created_key")
    if created is not None and resp.status_code != 201:
        # The key was made but its record could not be committed (the 503 `audit_unavailable`):
        # no key outlives a missing record. Its plaintext was never sent, so revoking it leaves
        # nothing usable; `steward keys create` undoes the same way. A revocation whose record
        # fails is kept instead (undoing it would revive a key someone meant to kill).
        try:
            await asyncio.to_thread(gw.keys.revoke, created)
        except Exception as exc:  # the store is down too: the caller has its 503 either way
            # The id is no secret (the log's fields are whitelisted, so it goes in the message).
            log.error(
                f"key {created} was created but not recorded, and could not be revoked: revoke it",
                exc_info=exc,
                extra={"request_id": trace.request_id},
            )
    return resp


def _check_models(models: list[str] | None) -> None:
    """The bounds `steward keys create` checks (an empty name would allow nothing, silently)."""
    if models is None:
        return
    if len(models) > MAX_KEY_MODELS:
        raise APIError(
            400,
            f"models may name at most {MAX_KEY_MODELS} models, got {len(models)}",
            param="models",
            code="invalid_value",
        )
    for i, m in enumerate(models):
        if not m.strip():
            raise APIError(400, "a model name must not be empty", param=f"models[{i}]", code="invalid_value")
        if len(m) > MAX_MODEL_CHARS:
            raise APIError(
                400,
                f"a model name must be at most {MAX_MODEL_CHARS} characters, got {len(m)}",
                param=f"models[{i}]",
                code="invalid_value",
            )


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
        _check_models(spec.models)
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
        trace.extra["created_key"] = rec.id  # for `_act`: revoked if the record fails
        return 201, {**rec.public(), "key": key}

    return await _act(request, "key.create", go)


@router.get("/keys")
async def list_keys(request: Request, tenant: str | None = None) -> Response:
    async def go(gw: Gateway, _p: Principal, trace: Trace) -> tuple[int, Any]:
        if tenant is not None:
            # A value that is no tenant id cannot name a tenant: refused, never cut to one (the
            # first 64 characters of a longer one are another, possibly existing, tenant, whose
            # auditors would see a list of their keys that never happened).
            if not TENANT_RE.match(tenant):
                raise APIError(
                    400,
                    "tenant must be a tenant id: 1 to 64 of A-Z a-z 0-9 _ . -, not starting with _",
                    param="tenant",
                    code="invalid_value",
                )
            trace.extra["target_tenant"] = tenant
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
