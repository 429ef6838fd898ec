"""Settles that failed (a short store outage) are kept and retried in the background.

A dropped settle would keep its concurrency lease until the lease TTL (locking the tenant out on a
limit of one) and leave the whole reservation charged to its windows. So a store limiter hands every
settle that raised `LimiterUnavailable` to a `SettleRetry`: a bounded queue retried with exponential
backoff by one task on the event loop, and tried once more when the limiter closes.

Retrying is safe because a settle is idempotent per reservation, in the store: the store applies it in
one atomic step (a transaction, a Lua script) that also records the reservation id as settled (a
marker that outlives any retry: `SETTLED_MARKER_TTL_S`), and a settle that finds the marker applies
nothing and counts as done. A failed attempt did not necessarily change nothing: a COMMIT (or a script)
can go through and only its reply be lost, and then the retry finds the marker. The reservation's
ledger is updated, and `settled` set, only after a step succeeded, so a settled reservation is skipped
without asking the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from steward.gateway.limits.base import Kind, LimiterUnavailable, Reservation

log = logging.getLogger("steward.gateway.limits")

GIVE_UP_S = 3600.0
"""How long a failed settle is retried before it is dropped."""

SETTLED_MARKER_TTL_S = 3 * GIVE_UP_S
"""How long the store keeps a settled reservation's marker: well past the last retry of a settle
whose attempt went through without a reply (retries start then and stop after `GIVE_UP_S`)."""

SettleFn = Callable[[Reservation, Mapping[Kind, float]], Awaitable[None]]


@dataclass
class _Pending:
    res: Reservation
    actual: dict[Kind, float]
    since: float
    attempts: int = 0
    due: float = 0.0


class SettleRetry:
    """Failed settles, retried with backoff (`first_s` doubling up to `max_s`) for up to `give_up_s`.

    At most `max_pending` are kept; past that a new one is dropped with an error (its lease still
    expires after the TTL). `settle_once` is the limiter's own settle without retry.
    """

    def __init__(
        self,
        settle_once: SettleFn,
        *,
        max_pending: int = 10_000,
        first_s: float = 0.5,
        max_s: float = 30.0,
        give_up_s: float = GIVE_UP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settle_once = settle_once
        self._max_pending = max_pending
        self._first_s = first_s
        self._max_s = max_s
        self._give_up_s = give_up_s
        self._clock = clock
        self._pending: dict[str, _Pending] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, reservation_id: object) -> bool:
        return reservation_id in self._pending

    def add(self, res: Reservation, actual: Mapping[Kind, float]) -> None:
        """Keep a settle that failed; the latest `actual` for a reservation wins."""
        if res.settled:
            return
        now = self._clock()
        if res.id in self._pending:
            self._pending[res.id].actual = dict(actual)
            return
        if len(self._pending) >= self._max_pending:
            log.error(
                "limit settlement failed and the retry queue is full (%d); dropping it",
                self._max_pending,
                extra={"reservation": res.id},
            )
            return
        self._pending[res.id] = _Pending(res, dict(actual), now, 0, now + self._first_s)
        self._start()

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a sync caller): the next add, or `flush`, retries
            return
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="steward-settle-retry")
        elif self._wake is not None:
            self._wake.set()

    async def _attempt(self, p: _Pending) -> bool:
        """One try: True when the reservation is settled (or given up on)."""
        if p.res.settled:
            return True
        try:
            await self._settle_once(p.res, p.actual)
        except (LimiterUnavailable, OSError) as exc:
            p.attempts += 1
            if self._clock() - p.since >= self._give_up_s:
                log.error(
                    "giving up on a limit settlement after %d tries: %s",
                    p.attempts,
                    exc,
                    extra={"reservation": p.res.id},
                )
                return True
            p.due = self._clock() + min(self._max_s, self._first_s * 2**p.attempts)
            return False
        except Exception:
            log.exception("limit settlement retry failed", extra={"reservation": p.res.id})
            return True
        log.info("limit settlement succeeded on retry", extra={"reservation": p.res.id})
        return True

    async def _run(self) -> None:
        while self._pending and not self._closing:
            now = self._clock()
            for rid, p in sorted(self._pending.items(), key=lambda kv: kv[1].due):
                if p.due > now or self._closing:
                    break
                if await self._attempt(p):
                    self._pending.pop(rid, None)
            if not self._pending or self._closing:
                break
            wait = max(0.0, min(p.due for p in self._pending.values()) - self._clock())
            assert self._wake is not None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def flush(self) -> int:
        """Stop the background task and try every pending settle once more (at shutdown); returns
        how many are still unsettled, which are dropped (their leases expire after the TTL)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            # Not cancelled mid-try: a settle running in a thread would go on and race the last try.
            self._closing = True
            if self._wake is not None:
                self._wake.set()
            try:
                await task
            except Exception:
                log.exception("the settle retry task failed")
        left = 0
        store_down = False
        for p in list(self._pending.values()):
            if not store_down:  # one failure says the store is still down: do not stall shutdown
                p.since = self._clock() - self._give_up_s  # one try only
                await self._attempt(p)
                store_down = not p.res.settled
            if not p.res.settled:
                left += 1
        self._pending.clear()
        self._closing = False
        if left:
            log.error("%d limit settlements could not be applied before shutdown", left)
        return left


class RetriedSettle:
    """`settle` for the store-backed limiters: one attempt now (`_settle_once`), and on a store
    failure the settle is also queued on `settle_retry`, which tries it again in the background
    and at shutdown; a settle for a reservation already queued only updates the queued usage."""

    settle_retry: SettleRetry

    async def _settle_once(self, reservation: Reservation, actual: Mapping[Kind, float]) -> None:
        raise NotImplementedError

    async def settle(self, reservation: Reservation, actual: Mapping[Kind, float]) -> None:
        if reservation.id in self.settle_retry:  # already queued: never two settles at once
            self.settle_retry.add(reservation, actual)
            return
        try:
            await self._settle_once(reservation, actual)
        except LimiterUnavailable:
            self.settle_retry.add(reservation, actual)
            raise
