"""Limits for one gateway process: counters in a dict behind a lock.

Exact only while one process serves; `make_limiter` never picks it for more than one worker. The lock
is a threading lock (not an asyncio one) and no method awaits while holding it, so the limiter is safe
to share between event loops and threads and one check-and-increment can never interleave another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

from steward.gateway.limits.base import (
    DEFAULT_LEASE_TTL_S,
    EPSILON,
    Clock,
    CounterKey,
    Kind,
    Limit,
    Reservation,
    decide,
    exceeded,
    extension_entries,
    increments,
    lease_scopes,
    merge_statuses,
    new_reservation,
    plan,
    record,
    settle_deltas,
    window_end,
)

_PRUNE_EVERY_S = 60.0


class MemoryLimiter:
    def __init__(self, *, clock: Clock = time.time, lease_ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        self._clock = clock
        self._lease_ttl_s = lease_ttl_s
        self._lock = threading.Lock()
        self._counters: dict[CounterKey, float] = {}
        self._leases: dict[str, dict[str, float]] = {}  # scope -> lease id -> expires at
        self._pruned_at = clock()

    def _live_leases(self, scope: str, now: float) -> int:
        held = self._leases.get(scope)
        if not held:
            return 0
        for lease_id in [i for i, exp in held.items() if exp <= now]:
            del held[lease_id]
        return len(held)

    def _prune(self, now: float) -> None:
        """Forget windows that have ended so a long-running server does not grow without bound."""
        if now - self._pruned_at < _PRUNE_EVERY_S:
            return
        self._pruned_at = now
        for key in [k for k in self._counters if window_end(k[2], k[3]) <= now]:  # type: ignore[arg-type]
            del self._counters[key]
        for scope in list(self._leases):
            if self._live_leases(scope, now) == 0:
                del self._leases[scope]

    async def reserve(self, limits: Sequence[Limit], amounts: Mapping[Kind, float]) -> Reservation:
        now = self._clock()
        entries = plan(limits, amounts, now)
        with self._lock:
            self._prune(now)
            leases = {s: self._live_leases(s, now) for s in lease_scopes(entries)}
            failed, statuses = decide(entries, self._counters, leases, now)
            if failed is not None:
                raise exceeded(failed, statuses, now)
            for key, amount in increments(entries).items():
                self._counters[key] = self._counters.get(key, 0.0) + amount
            res = new_reservation(entries, statuses)
            for scope, lease_id in res.leases.items():
                self._leases.setdefault(scope, {})[lease_id] = now + self._lease_ttl_s
            return res

    async def extend(self, reservation: Reservation, amounts: Mapping[Kind, float]) -> bool:
        if reservation.settled:
            return False
        now = self._clock()
        entries = extension_entries(reservation, amounts, now)
        with self._lock:
            failed, statuses = decide(entries, self._counters, {}, now)
            if failed is not None:
                return False
            for scope, lease_id in reservation.leases.items():
                if self._leases.get(scope, {}).get(lease_id, 0.0) > now:
                    continue
                # Expired, and maybe reclaimed: taken again only if its limit has room now.
                limit = min(
                    (x.limit for x in reservation.limits if x.kind == "concurrent" and x.scope == scope),
                    default=0.0,
                )
                if self._live_leases(scope, now) + 1 > limit + EPSILON:
                    return False
            for key, amount in increments(entries).items():
                self._counters[key] = self._counters.get(key, 0.0) + amount
            record(reservation, entries)
            for scope, lease_id in reservation.leases.items():
                self._leases.setdefault(scope, {})[lease_id] = now + self._lease_ttl_s
            merge_statuses(reservation, statuses)
            return True

    async def settle(self, reservation: Reservation, actual: Mapping[Kind, float]) -> None:
        if reservation.settled:
            return
        now = self._clock()
        with self._lock:
            for key, delta in settle_deltas(reservation, actual, now).items():
                if key in self._counters or delta > 0:
                    self._counters[key] = max(0.0, self._counters.get(key, 0.0) + delta)
            for scope, lease_id in reservation.leases.items():
                self._leases.get(scope, {}).pop(lease_id, None)
            reservation.settled = True

    @property
    def lease_ttl_s(self) -> float:
        return self._lease_ttl_s

    async def aclose(self) -> None:
        return None
