"""Turns each finished request's trace into an audit event and commits it before the response.

Group commit (`steward.audit.GroupCommitter`) batches the events of concurrent requests into one
transaction, so durability per request costs a queue hop, not an fsync each. If the log cannot
commit, the request fails with 503: an answer without its record would be a lost audit record.

An admin act on another tenant (the route puts it in `trace.extra["target_tenant"]`) names that
tenant in `detail.target_tenant` and is recorded twice: under the admin's tenant, and filed under
the target tenant (`detail.mirror_of` names the first), so that tenant's auditors see, and can
prove, what was done to it. Nothing from the request itself (path, query, target) is recorded
before the key is known; after that, only bounded, route-chosen values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from steward.audit import AuditEvent, AuditLog, Finding, GroupCommitter, Principal
from steward.audit.events import new_event_id
from steward.gateway.keys import TENANT_RE
from steward.gateway.trace import Trace

log = logging.getLogger("steward.gateway")

UNAUTHENTICATED = "_unauthenticated"  # tenant of refusals that happen before a key is known
MAX_TEXT = 64  # any request-chosen text an event holds is cut to this many characters
MAX_QUERY = 8


def _bounded(value: Any) -> str:
    return str(value)[:MAX_TEXT]


def _target_tenant(trace: Trace) -> str | None:
    """The tenant an authenticated admin act was aimed at, if it is a well-formed tenant id."""
    if trace.key_id is None:
        return None
    for k in ("target_tenant", "tenant_target"):
        v = trace.extra.get(k)
        if isinstance(v, str) and TENANT_RE.match(v):
            return v
    return None


def event_from_trace(trace: Trace) -> AuditEvent:
    if trace.route.startswith(("GET /admin", "POST /admin", "PUT /admin", "DELETE /admin")):
        kind = "admin"
    elif trace.route.startswith(("GET /audit", "POST /audit")):
        kind = "access"
    elif trace.status in (401, 403, 429):
        kind = "refusal"
    else:
        kind = "inference"
    findings = tuple(
        Finding(
            category=str(f.get("category")),
            score=float(f.get("score", 0.0)),
            action=str(f.get("action", "flag")),
            stage=str(v.get("stage", "input")),
            scanner=f.get("scanner"),
        )
        for v in trace.guard
        for f in v.get("findings", [])
    )
    usage = {
        k: int(v) for k, v in trace.usage.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    detail: dict[str, Any] = {"stream": trace.stream, "backend": trace.backend}
    if trace.error:
        detail["error_code"] = trace.error.get("code")
        detail["error_type"] = trace.error.get("type")
    if trace.guard:
        detail["guard"] = [
            {
                k: v[k]
                for k in ("stage", "action", "scanned", "categories", "choice", "cut", "policy")
                if k in v
            }
            for v in trace.guard
        ]
    if trace.limits:
        detail["limits"] = trace.limits
    if "admin_action" in trace.usage:
        detail["action"] = trace.usage["admin_action"]
        usage = {}
    if trace.key_id is not None:  # never anything request-chosen before the key is known
        if "target" in trace.extra:
            detail["target"] = _bounded(trace.extra["target"])
        query = trace.extra.get("query")
        if isinstance(query, dict) and query:
            detail["query"] = {_bounded(k): _bounded(v) for k, v in list(query.items())[:MAX_QUERY]}
    target_tenant = _target_tenant(trace)
    if target_tenant is not None:
        detail["target_tenant"] = target_tenant
    return AuditEvent(
        kind=kind,
        principal=Principal(
            tenant=trace.tenant or UNAUTHENTICATED,
            key_id=trace.key_id,
            key_prefix=trace.key_prefix,
            role=trace.role,
        ),
        outcome=trace.outcome,
        status=trace.status,
        request_id=trace.request_id,
        route=trace.route,
        model_id=trace.model,
        weights_hash=trace.weights_sha256,
        policy_version=trace.policy_version,
        findings=findings,
        usage=usage,
        latencies_ms=dict(trace.latency_ms),
        detail=detail,
        subject=trace.user,
        payload=trace.payload,
    )


def events_from_trace(trace: Trace) -> list[AuditEvent]:
    """The trace's event, and for an admin act on another tenant its copy filed under that tenant."""
    ev = event_from_trace(trace)
    target = ev.detail.get("target_tenant")
    if ev.kind != "admin" or not isinstance(target, str) or target == ev.principal.tenant:
        return [ev]
    mirror = dataclasses.replace(
        ev,
        filed_under=target,
        event_id=new_event_id(),
        detail={**ev.detail, "mirror_of": ev.event_id},
        subject=None,
        payload=None,
    )
    return [ev, mirror]


class AuditSink:
    def __init__(
        self,
        engine: Engine,
        data_dir: Path,
        *,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 10.0,
    ) -> None:
        self.log = AuditLog.open(
            engine,
            data_dir / "keys",
            checkpoint_every=checkpoint_every,
            checkpoint_interval_s=checkpoint_interval_s,
        )
        # No waiting for company: a lone request commits at once; requests that arrive while a
        # commit runs form the next batch (group commit without a timer on the latency path).
        self.committer = GroupCommitter(self.log, max_wait_s=0.0)

    async def record(self, trace: Trace) -> None:
        events = events_from_trace(trace)
        receipts = await asyncio.gather(*(self.committer.append(e) for e in events))
        trace.audit = {"index": receipts[0].index, "event_id": receipts[0].event_id}

    def close(self) -> None:
        """Drain pending events and sign a final checkpoint (SIGTERM goes through here)."""
        try:
            self.committer.close()
        finally:
            self.log.close()
