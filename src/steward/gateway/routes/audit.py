"""Audit API: signed checkpoints, inclusion and consistency proofs, events and payloads.

Only `auditor` and `admin` keys read the log, each only its own tenant's events. Reading a payload
in clear needs `auditor`. Every request here, read or refusal, is itself recorded as an `access`
event before the answer leaves (through `Gateway.traced`). The record names the route's template
("GET /audit/events/{event_id}/payload"), never the raw path; the event id and query parameters are
recorded only once the key is known, and cut to a bounded length.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from steward.gateway.errors import APIError
from steward.gateway.keys import Principal
from steward.gateway.service import Gateway
from steward.gateway.trace import Trace

router = APIRouter(prefix="/audit")

MAX_PARAM = 64  # characters of a query parameter that go on the record
_EVENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,40}\Z")


def _trace(request: Request, route: str) -> Trace:
    state = request.scope.get("state", {})
    return Trace(request_id=state.get("request_id", ""), route=route)


async def _traced(
    request: Request, route: str, work: Callable[[Trace], Awaitable[tuple[int, Any]]]
) -> Response:
    gw: Gateway = request.app.state.gateway
    trace = _trace(request, route)
    return await gw.traced(trace, lambda: work(trace))


async def _reader(
    request: Request, trace: Trace, query: tuple[str, ...] = (), target: str | None = None
) -> tuple[Gateway, Principal, Any]:
    gw: Gateway = request.app.state.gateway
    p = await gw.principal(request, trace)
    # Known key from here on: what was asked for goes on the record, bounded.
    q = {n: request.query_params[n][:MAX_PARAM] for n in query if n in request.query_params}
    if q:
        trace.extra["query"] = q
    if target is not None:
        trace.extra["target"] = target if _EVENT_ID.match(target) else f"(malformed, {len(target)} chars)"
    if p.role not in ("auditor", "admin"):
        raise APIError(
            403, "the audit log is readable by auditor and admin keys only", code="role_not_allowed"
        )
    if gw.audit is None:
        raise APIError(404, "the audit log is disabled on this gateway", code="audit_disabled")
    return gw, p, gw.audit.log


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise APIError(400, f"{name} must be a non-negative integer", param=name, code="invalid_value")
    return int(raw)


def _own_event(log: Any, ref: int | str, tenant: str) -> Any:
    try:
        ev = log.get_event(ref, tenant=tenant)
    except (LookupError, ValueError):
        ev = None
    if ev is None or ev.tenant != tenant:
        raise APIError(404, "no such audit event for this tenant", code="event_not_found")
    return ev


@router.get("/checkpoint")
async def checkpoint(request: Request) -> Response:
    async def work(trace: Trace) -> tuple[int, Any]:
        _gw, _p, log = await _reader(request, trace)
        cp = await asyncio.to_thread(log.latest_checkpoint)
        if cp is None:
            raise APIError(404, "no checkpoint has been signed yet", code="no_checkpoint")
        return 200, {
            "origin": cp.origin,
            "tree_size": cp.size,
            "root_hash": base64.b64encode(cp.root).decode(),
            "note": cp.note,
        }

    return await _traced(request, "GET /audit/checkpoint", work)


@router.get("/proof/inclusion")
async def inclusion(request: Request) -> Response:
    async def work(trace: Trace) -> tuple[int, Any]:
        _gw, p, log = await _reader(request, trace, ("event_id", "index", "tree_size"))
        event_id = request.query_params.get("event_id")
        index = _int(request, "index")
        if (event_id is None) == (index is None):
            raise APIError(400, "give exactly one of index or event_id", param="index", code="invalid_value")
        ref: int | str = event_id if event_id is not None else (index or 0)
        ev = await asyncio.to_thread(_own_event, log, ref, p.tenant)
        size = _int(request, "tree_size")
        try:
            proof = await asyncio.to_thread(log.inclusion_proof, ev.index, size)
        except (ValueError, LookupError) as exc:
            raise APIError(400, str(exc), param="tree_size", code="invalid_value") from None
        return 200, {"event_id": ev.event_id, **proof.to_json()}

    return await _traced(request, "GET /audit/proof/inclusion", work)


@router.get("/proof/consistency")
async def consistency(request: Request) -> Response:
    async def work(trace: Trace) -> tuple[int, Any]:
        _gw, _p, log = await _reader(request, trace, ("first", "second"))
        first, second = _int(request, "first"), _int(request, "second")
        if first is None or second is None:
            raise APIError(
                400, "first and second tree sizes are required", param="first", code="invalid_value"
            )
        try:
            proof = await asyncio.to_thread(log.consistency_proof, first, second)
        except (ValueError, LookupError) as exc:
            raise APIError(400, str(exc), param="second", code="invalid_value") from None
        return 200, {"first": first, "second": second, "proof": [base64.b64encode(h).decode() for h in proof]}

    return await _traced(request, "GET /audit/proof/consistency", work)


@router.get("/events")
async def events(request: Request) -> Response:
    async def work(trace: Trace) -> tuple[int, Any]:
        _gw, p, log = await _reader(request, trace, ("after", "limit"))
        after = _int(request, "after", -1)
        limit = min(_int(request, "limit", 100) or 100, 1000)
        rows = await asyncio.to_thread(log.list_events, tenant=p.tenant, after=after, limit=limit)
        return 200, {"object": "list", "data": [{"index": e.index, **e.meta} for e in rows]}

    return await _traced(request, "GET /audit/events", work)


@router.get("/events/{event_id}/payload")
async def payload(event_id: str, request: Request) -> Response:
    async def work(trace: Trace) -> tuple[int, Any]:
        _gw, p, log = await _reader(request, trace, target=event_id)
        if p.role != "auditor":
            raise APIError(403, "reading payloads in clear needs an auditor key", code="role_not_allowed")
        ev = await asyncio.to_thread(_own_event, log, event_id, p.tenant)
        from steward.audit import PayloadUnavailable

        try:
            data = await asyncio.to_thread(log.read_payload, ev, tenant=p.tenant)
        except PayloadUnavailable as exc:
            raise APIError(410, f"payload no longer readable: {exc}", code="payload_erased") from None
        return 200, {"event_id": ev.event_id, "payload": data}

    # The read is on the record before the payload leaves the gateway.
    return await _traced(request, "GET /audit/events/{event_id}/payload", work)
