"""Turns each finished request's trace into an audit event and commits it before the response.

Group commit (`steward.audit.GroupCommitter`) batches the events of concurrent requests into one
transaction, so durability per request costs a queue hop, not an fsync each. If the log cannot
commit, the request fails with 503: an answer without its record would be a lost audit record.

An admin act on another tenant (the route puts it in `trace.extra["target_tenant"]`) names that
tenant in `detail.target_tenant` and is recorded twice: under the admin's tenant, and filed under
the target tenant (`detail.mirror_of` names the first), so that tenant's auditors see, and can
prove, what was done to it. Nothing from the request itself (path, query, target) is recorded
before the key is known; after that, only bounded, route-chosen values.

Refusals before any key is known (401s) are the one kind anybody can produce without limit, and the
log is append-only: recorded one by one, a client looping on a bad key would grow it by ~9 GB a
day and hold the store's write lock between real requests. So each minute the first
`audit_unauthenticated_per_minute` of them are recorded one by one (enough to see who probes and
how), and the rest of that minute are *counted*: one summary event when the minute ends (by route
template and status) says how many were not recorded singly. Nothing is lost that the log would
have held, since a refusal before the key is known carries nothing of the request but its route.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
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
MAX_COUNT = 1_000_000  # a count the backend reports (attempts, fallbacks) is recorded up to this


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


def _upstream_detail(trace: Trace) -> dict[str, Any]:
    """What the backend learnt about the call, for the event's detail.

    `trace.extra["upstream"]` is the call's `metadata` (the backend writes it; nothing in it comes
    from the request): `served_by` (the fallback member that answered, a routing-table name),
    `fallbacks` (members that failed before it), `upstream_attempts` (HTTP attempts at the one
    that answered or failed last) and `usage_estimated`. `trace.usage["estimated"]` marks usage
    the gateway counted itself (the backend's estimate, or a stream the gateway cut). Only
    bounded values of the expected types are recorded.
    """
    out: dict[str, Any] = {}
    meta = trace.extra.get("upstream")
    meta = meta if isinstance(meta, Mapping) else {}
    served_by = meta.get("served_by")
    if isinstance(served_by, str):
        out["served_by"] = _bounded(served_by)
    for k in ("fallbacks", "upstream_attempts"):
        v = meta.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT:
            out[k] = v
    if meta.get("usage_estimated") is True or trace.usage.get("estimated") is True:
        out["usage_estimated"] = True
    return out


def event_from_trace(trace: Trace) -> AuditEvent:
    # /metrics is an admin read (every tenant's volume), recorded like GET /admin/tenants.
    if trace.route.startswith(("GET /admin", "POST /admin", "PUT /admin", "DELETE /admin", "GET /metrics")):
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
                for k in ("stage", "field", "action", "scanned", "categories", "choice", "cut", "policy")
                if k in v
            }
            for v in trace.guard
        ]
    if trace.limits:
        detail["limits"] = trace.limits
    detail.update(_upstream_detail(trace))
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


class RefusalSampler:
    """Counts unauthenticated refusals per window: the first `limit` of a window are recorded one
    by one, the others only counted, and `summary` turns the counts into one event."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._start = time.monotonic()
        self._wall_start = datetime.now(UTC)
        self._admitted = 0
        self._counted: Counter[tuple[str, int]] = Counter()

    def due(self, now: float) -> bool:
        return now - self._start >= self.window_s

    def remaining(self, now: float) -> float:
        return max(0.0, self.window_s - (now - self._start))

    def admit(self, route: str, status: int) -> bool:
        """True: record this refusal itself; False: it is counted for the window's summary."""
        if self._admitted < self.limit:
            self._admitted += 1
            return True
        self._counted[(route, status)] += 1
        return False

    def summary(self, now: float) -> AuditEvent | None:
        """The closing window's summary event (None when nothing was counted); starts a new window."""
        counted, since = self._counted, self._wall_start
        self._start, self._wall_start = now, datetime.now(UTC)
        self._admitted, self._counted = 0, Counter()
        if not counted:
            return None
        by_route: Counter[str] = Counter()
        by_status: Counter[str] = Counter()
        for (route, status), n in counted.items():
            by_route[route] += n
            by_status[str(status)] += n
        return AuditEvent(
            kind="refusal",
            principal=Principal(tenant=UNAUTHENTICATED, key_id=None, key_prefix=None, role=None),
            outcome="refused",
            route="(unauthenticated refusals, summarised)",
            detail={
                "summary": True,
                "count": sum(counted.values()),
                "recorded_singly": self.limit,
                "since": since.isoformat(),
                "until": datetime.now(UTC).isoformat(),
                "by_route": dict(by_route.most_common(MAX_QUERY)),
                "by_status": dict(by_status),
            },
        )


class AuditSink:
    def __init__(
        self,
        engine: Engine,
        data_dir: Path,
        *,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 10.0,
        unauthenticated_per_minute: int | None = None,
    ) -> None:
        """`unauthenticated_per_minute`: None records every refusal before a key is known singly."""
        self.log = AuditLog.open(
            engine,
            data_dir / "keys",
            checkpoint_every=checkpoint_every,
            checkpoint_interval_s=checkpoint_interval_s,
        )
        # No waiting for company: a lone request commits at once; requests that arrive while a
        # commit runs form the next batch (group commit without a timer on the latency path).
        self.committer = GroupCommitter(self.log, max_wait_s=0.0)
        self.sampler = (
            RefusalSampler(unauthenticated_per_minute) if unauthenticated_per_minute is not None else None
        )
        self._flush: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    async def record(self, trace: Trace) -> None:
        if self.sampler is not None and trace.key_id is None and trace.status == 401:
            now = time.monotonic()
            if self.sampler.due(now):
                await self._summarise(now)
            if not self.sampler.admit(trace.route, trace.status):
                trace.audit = {"summarised": True}
                if self._flush is None:  # the window's summary is written when it ends, come what may
                    loop = asyncio.get_running_loop()
                    self._flush = loop.call_later(self.sampler.remaining(now), self._flush_later)
                return
        events = events_from_trace(trace)
        receipts = await asyncio.gather(*(self.committer.append(e) for e in events))
        trace.audit = {"index": receipts[0].index, "event_id": receipts[0].event_id}

    def _flush_later(self) -> None:
        self._flush = None
        task = asyncio.ensure_future(self._summarise(time.monotonic()))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _summarise(self, now: float) -> None:
        assert self.sampler is not None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        event = self.sampler.summary(now)
        if event is not None:
            try:
                await self.committer.append(event)
            except Exception:
                log.exception("the summary of unauthenticated refusals could not be committed")

    def close(self) -> None:
        """Drain pending events and sign a final checkpoint (SIGTERM goes through here)."""
        try:
            if self._flush is not None:
                self._flush.cancel()
            event = self.sampler.summary(time.monotonic()) if self.sampler is not None else None
            if event is not None:
                self.committer.submit(event).result(timeout=30)
        except Exception:
            log.exception("the summary of unauthenticated refusals could not be committed")
        try:
            self.committer.close()
        finally:
            self.log.close()
