"""Turns each finished request's trace into an audit event and commits it before the response.

Group commit (`steward.audit.GroupCommitter`) batches the events of concurrent requests into one
transaction, so durability per request costs a queue hop, not an fsync each. If the log cannot
commit, the request fails with 503: an answer without its record would be a lost audit record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from steward.audit import AuditEvent, AuditLog, Finding, GroupCommitter, Principal
from steward.gateway.trace import Trace

log = logging.getLogger("steward.gateway")

UNAUTHENTICATED = "_unauthenticated"  # tenant of refusals that happen before a key is known


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
    for k in ("target", "tenant_target"):
        if k in trace.extra:
            detail[k] = trace.extra[k]
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
        receipt = await self.committer.append(event_from_trace(trace))
        trace.audit = {"index": receipt.index, "event_id": receipt.event_id}

    def close(self) -> None:
        """Drain pending events and sign a final checkpoint (SIGTERM goes through here)."""
        try:
            self.committer.close()
        finally:
            self.log.close()
