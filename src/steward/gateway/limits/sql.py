"""Limits in the gateway's database, for several workers without Redis.

Each reserve is one transaction that reads the counters, decides, and increments them. What makes it
exact across processes:

* SQLite: the engine starts every transaction with BEGIN IMMEDIATE (`steward.store.db`), so writers
  are serialised by the file lock and a read-decide-write can never interleave another.
* PostgreSQL: READ COMMITTED alone would let two transactions read the same count and both admit, so
  each transaction first takes `pg_advisory_xact_lock` on every scope it touches, in sorted order (no
  deadlocks), released at commit. Counters are upserted with INSERT ... ON CONFLICT.

A settle that changes counters also inserts the reservation id into `limit_settled` in the same
transaction; a settle that finds it there (a retry after a COMMIT whose reply was lost) applies
nothing and counts as done. Markers expire after `SETTLED_MARKER_TTL_S` and are swept with the ended
windows.

The database work is synchronous SQLAlchemy run on the limiter's own few threads, not asyncio's shared
default executor: a call waiting for the SQLite write lock (another writer, up to the store's lock
wait) holds its thread, and must not hold up the process's other `asyncio.to_thread` work. Times
come from the injectable clock, not the database, so tests can stand on a window boundary.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Table, and_, case, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from steward.gateway.limits.base import (
    DEFAULT_LEASE_TTL_S,
    EPSILON,
    WINDOWS,
    Clock,
    CounterKey,
    Entry,
    Kind,
    Limit,
    LimiterUnavailable,
    LimitExceeded,
    LimitStatus,
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
    window_bounds,
)
from steward.gateway.limits.retry import SETTLED_MARKER_TTL_S, RetriedSettle, SettleRetry
from steward.store.db import lock_wait
from steward.store.models import LimitCounter, LimitLease, LimitSettled

_COUNTERS: Table = LimitCounter.__table__  # type: ignore[assignment]
_LEASES: Table = LimitLease.__table__  # type: ignore[assignment]
_SETTLED: Table = LimitSettled.__table__  # type: ignore[assignment]
_CLEAN_EVERY_S = 60.0
_THREADS = 4
"""The limiter's own worker threads. Few: SQLite serialises writers anyway, and on PostgreSQL each
transaction is a handful of sub-millisecond statements."""
RESERVE_LOCK_WAIT_S = 5.0
"""How long a reservation (a request waiting to be admitted) waits for SQLite's write lock before
its 503, instead of the store's 30 s: transactions last well under a millisecond, so a lock held
this long is held by something else (an erase, a backup, the sqlite3 shell). Settles keep the
store's wait; they are retried in the background anyway."""

_T = TypeVar("_T")


class _LeaseLost(Exception):
    """A refresh found a lease expired and its limit full: the extension is rolled back."""


def _lock_id(scope: str) -> int:
    """A signed 64-bit advisory lock id per scope; a collision only serialises two scopes, harmlessly."""
    return int.from_bytes(hashlib.blake2b(scope.encode(), digest_size=8).digest(), "big", signed=True)


def _key_clause(key: CounterKey) -> Any:
    scope, kind, window, start = key
    c = _COUNTERS.c
    return and_(c.scope == scope, c.kind == kind, c.window == window, c.window_start == start)


class SQLLimiter(RetriedSettle):
    """Exact limits on SQLite or PostgreSQL; the caller owns `engine` (migrated to head)."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock = time.time,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        lock_wait_s: float = RESERVE_LOCK_WAIT_S,
    ) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {engine.dialect.name!r}")
        self._engine = engine
        self._admit_engine = lock_wait(engine, lock_wait_s)
        self._pg = engine.dialect.name == "postgresql"
        self._clock = clock
        self._lease_ttl_s = lease_ttl_s
        self.settle_retry = SettleRetry(self._settle_once)
        self._cleaned_at = clock()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`asyncio.to_thread` on the limiter's own threads (created on first use, shut in `aclose`)."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(_THREADS, thread_name_prefix="steward-limits")
            executor = self._executor
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    # --- the transaction pieces -----------------------------------------------------------------

    def _lock(self, conn: Connection, scopes: Sequence[str]) -> None:
        if self._pg:
            for lock in sorted({_lock_id(s) for s in scopes}):
                conn.execute(select(func.pg_advisory_xact_lock(lock)))

    def _used(self, conn: Connection, keys: Sequence[CounterKey]) -> dict[CounterKey, float]:
        used: dict[CounterKey, float] = {}
        for key in keys:
            value = conn.execute(select(_COUNTERS.c.used).where(_key_clause(key))).scalar()
            if value is not None:
                used[key] = float(value)
        return used

    def _live_leases(self, conn: Connection, scopes: Sequence[str], now: float) -> dict[str, int]:
        out = {}
        for scope in scopes:
            conn.execute(delete(_LEASES).where(_LEASES.c.scope == scope, _LEASES.c.expires_at <= now))
            n = conn.execute(select(func.count()).select_from(_LEASES).where(_LEASES.c.scope == scope))
            out[scope] = int(n.scalar() or 0)
        return out

    def _add(self, conn: Connection, key: CounterKey, amount: float) -> None:
        scope, kind, window, start = key
        ins = (pg_insert if self._pg else sqlite_insert)(_COUNTERS).values(
            scope=scope, kind=kind, window=window, window_start=start, used=amount
        )
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=["scope", "kind", "window", "window_start"],
                set_={"used": _COUNTERS.c.used + ins.excluded.used},
            )
        )

    def _refund(self, conn: Connection, key: CounterKey, amount: float) -> None:
        used = _COUNTERS.c.used
        conn.execute(
            update(_COUNTERS)
            .where(_key_clause(key))
            .values(used=case((used - amount < 0, 0.0), else_=used - amount))
        )

    def _put_leases(self, conn: Connection, leases: Mapping[str, str], expires_at: float) -> None:
        for scope, lease_id in sorted(leases.items()):
            ins = (pg_insert if self._pg else sqlite_insert)(_LEASES).values(
                id=lease_id, scope=scope, expires_at=expires_at
            )
            conn.execute(ins.on_conflict_do_update(index_elements=["id"], set_={"expires_at": expires_at}))

    def _check_and_add(
        self,
        conn: Connection,
        entries: Sequence[Entry],
        now: float,
        *,
        check_leases: bool,
        also_lock: Sequence[str] = (),
    ) -> tuple[Entry | None, list[LimitStatus]]:
        # One sorted lock call per transaction: taking locks in two batches could invert the order.
        self._lock(conn, [e.limit.scope for e in entries] + list(also_lock))
        keys = sorted(increments(entries))
        used = self._used(conn, keys)
        leases = self._live_leases(conn, lease_scopes(entries), now) if check_leases else {}
        failed, statuses = decide(entries, used, leases, now, check_leases=check_leases)
        if failed is None:
            for key in keys:
                amount = increments(entries)[key]
                if amount:
                    self._add(conn, key, amount)
        return failed, statuses

    def _clean(self, now: float) -> None:
        """Drop ended windows and expired leases now and then so the tables stay small."""
        if now - self._cleaned_at < _CLEAN_EVERY_S:
            return
        self._cleaned_at = now
        try:
            self._delete_old(now)
        except SQLAlchemyError:
            # Housekeeping only: the reservation is committed, so a failure here must not refuse it.
            self._cleaned_at -= _CLEAN_EVERY_S

    def _delete_old(self, now: float) -> None:
        with self._engine.begin() as conn:
            for window in WINDOWS:
                # Keep the previous window a while: another worker's clock may still be in it.
                start = window_bounds(window, now - _CLEAN_EVERY_S * 2)[0]
                c = _COUNTERS.c
                conn.execute(delete(_COUNTERS).where(c.window == window, c.window_start < start))
            conn.execute(delete(_LEASES).where(_LEASES.c.expires_at <= now - _CLEAN_EVERY_S))
            conn.execute(delete(_SETTLED).where(_SETTLED.c.expires_at <= now))

    def _mark_settled(self, conn: Connection, res: Reservation, now: float) -> bool:
        """Record `res` as settled in this transaction; False if it already was (by an attempt whose
        COMMIT went through but whose reply was lost): then the caller must apply nothing."""
        ins = (pg_insert if self._pg else sqlite_insert)(_SETTLED).values(
            id=res.id, expires_at=now + SETTLED_MARKER_TTL_S
        )
        # preserve_rowcount: SQLAlchemy reports an INSERT's rowcount only when asked (psycopg: -1).
        stmt = ins.on_conflict_do_nothing(index_elements=["id"]).execution_options(preserve_rowcount=True)
        return conn.execute(stmt).rowcount == 1

    # --- sync bodies, run in a thread -----------------------------------------------------------

    def _reserve_sync(self, limits: Sequence[Limit], amounts: Mapping[Kind, float]) -> Reservation:
        now = self._clock()
        entries = plan(limits, amounts, now)
        with self._admit_engine.begin() as conn:
            failed, statuses = self._check_and_add(conn, entries, now, check_leases=True)
            if failed is not None:
                # Commit anyway: the only writes are deletions of expired leases.
                denial: LimitExceeded | None = exceeded(failed, statuses, now)
                res = None
            else:
                denial = None
                res = new_reservation(entries, statuses)
                self._put_leases(conn, res.leases, now + self._lease_ttl_s)
        self._clean(now)
        if denial is not None:
            raise denial
        assert res is not None
        return res

    def _refresh_leases(self, conn: Connection, res: Reservation, now: float) -> bool:
        """Extend the reservation's leases that are still live; a lease that expired (and may have
        been reclaimed by another request) is taken again only if its limit has room now, else the
        lease is lost: False. Never an upsert, which would put back a slot another request holds."""
        expires_at = now + self._lease_ttl_s
        for scope, lease_id in sorted(res.leases.items()):
            done = conn.execute(
                update(_LEASES)
                .where(_LEASES.c.id == lease_id, _LEASES.c.expires_at > now)
                .values(expires_at=expires_at)
            )
            if done.rowcount:
                continue
            limit = min(
                (lim.limit for lim in res.limits if lim.kind == "concurrent" and lim.scope == scope),
                default=0.0,
            )
            live = self._live_leases(conn, [scope], now)[scope]
            if live + 1 > limit + EPSILON:
                return False
            conn.execute(delete(_LEASES).where(_LEASES.c.id == lease_id))
            self._put_leases(conn, {scope: lease_id}, expires_at)
        return True

    def _extend_sync(self, res: Reservation, amounts: Mapping[Kind, float]) -> bool:
        now = self._clock()
        entries = extension_entries(res, amounts, now)
        try:
            with self._admit_engine.begin() as conn:
                failed, statuses = self._check_and_add(
                    conn, entries, now, check_leases=False, also_lock=list(res.leases)
                )
                if failed is not None:
                    return False
                if not self._refresh_leases(conn, res, now):
                    raise _LeaseLost  # roll back what `_check_and_add` counted
        except _LeaseLost:
            return False
        record(res, entries)
        merge_statuses(res, statuses)
        return True

    def _settle_sync(self, res: Reservation, actual: Mapping[Kind, float]) -> None:
        now = self._clock()
        # Work on a copy of the ledger: if the transaction fails the reservation is left unsettled.
        trial = Reservation(res.id, res.limits, dict(res.amounts), dict(res.windows), res.statuses)
        trial.counted = dict(res.counted)
        deltas = settle_deltas(trial, actual, now)
        if not deltas and not res.leases:
            res.counted, res.amounts, res.settled = trial.counted, trial.amounts, True
            return
        with self._engine.begin() as conn:
            self._lock(conn, sorted({k[0] for k in deltas} | set(res.leases)))
            # Counter deltas are not idempotent, so they go with a marker; releasing leases is.
            if deltas and self._mark_settled(conn, res, now):
                for key, delta in sorted(deltas.items()):
                    if delta > 0:
                        self._add(conn, key, delta)
                    else:
                        self._refund(conn, key, -delta)
            if res.leases:
                conn.execute(delete(_LEASES).where(_LEASES.c.id.in_(sorted(res.leases.values()))))
        res.counted, res.amounts, res.settled = trial.counted, trial.amounts, True

    # --- the async API --------------------------------------------------------------------------

    async def reserve(self, limits: Sequence[Limit], amounts: Mapping[Kind, float]) -> Reservation:
        if not limits:  # most tenants have no limits: no round trip to the database
            return new_reservation([], [])
        try:
            return await self._in_thread(self._reserve_sync, limits, amounts)
        except (SQLAlchemyError, OSError) as exc:
            raise LimiterUnavailable(f"limit store failed: {type(exc).__name__}") from exc

    async def extend(self, reservation: Reservation, amounts: Mapping[Kind, float]) -> bool:
        if reservation.settled:
            return False
        if not reservation.limits:
            return True
        try:
            return await self._in_thread(self._extend_sync, reservation, amounts)
        except (SQLAlchemyError, OSError) as exc:
            raise LimiterUnavailable(f"limit store failed: {type(exc).__name__}") from exc

    async def _settle_once(self, reservation: Reservation, actual: Mapping[Kind, float]) -> None:
        if reservation.settled:
            return
        if not reservation.limits:
            reservation.settled = True
            return
        try:
            await self._in_thread(self._settle_sync, reservation, actual)
        except (SQLAlchemyError, OSError) as exc:
            raise LimiterUnavailable(f"limit store failed: {type(exc).__name__}") from exc

    @property
    def lease_ttl_s(self) -> float:
        return self._lease_ttl_s

    async def aclose(self) -> None:
        """Try the settles still queued once more, then stop the limiter's threads (a later call
        starts them again); the engine belongs to the caller."""
        await self.settle_retry.flush()
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)  # idle after the flush; never block the event loop
