"""Exact limits on every store: memory, SQLite, PostgreSQL and Redis behave the same.

A fake clock stands each test where it needs to be (the last half-second of a minute, the last seconds
of a month) so windows are tested without sleeping. The cross-process tests start real OS processes
against one SQLite file, one PostgreSQL database and one Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from sqlalchemy import text

from servers import RedisServer, free_port
from steward.gateway.limits import (
    Limit,
    Limiter,
    LimiterUnavailable,
    LimitExceeded,
    LimitStatus,
    MemoryLimiter,
    RedisLimiter,
    Reservation,
    SQLLimiter,
    format_reset,
    make_limiter,
    ratelimit_headers,
    window_bounds,
)
from steward.gateway.limits.base import Reservation as _Res
from steward.gateway.limits.base import counter_key, settle_deltas
from steward.store import make_engine, upgrade

T = TypeVar("T")
STORES = ["memory", "sqlite", "postgres", "redis"]


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


NOON = ts(2025, 6, 15, 12, 0, 0) + 20.0  # 12:00:20, well inside a minute


class FakeClock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


NewLimiter = Callable[..., Limiter]


@pytest.fixture(params=STORES)
def new_limiter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewLimiter]:
    """A factory of limiters on one fresh store. Each call is another "process" on the same store
    (for memory, which cannot be shared, the same instance)."""
    store = request.param
    engine = None
    url = ""
    if store == "sqlite":
        engine = upgrade(f"sqlite:///{tmp_path / 'limits.db'}")
    elif store == "postgres":
        engine = upgrade(request.getfixturevalue("fresh_pg_url"))
    elif store == "redis":
        url = request.getfixturevalue("fresh_redis_url")
    memory: list[MemoryLimiter] = []

    def new(clock: FakeClock, **kw: Any) -> Limiter:
        if store == "memory":
            if not memory:
                memory.append(MemoryLimiter(clock=clock, **kw))
            return memory[0]
        if store == "redis":
            return RedisLimiter(url, clock=clock, **kw)
        assert engine is not None
        return SQLLimiter(engine, clock=clock, **kw)

    yield new
    if engine is not None:
        engine.dispose()


def status(res_or_exc: Reservation | LimitExceeded, limit: Limit) -> LimitStatus:
    return next(s for s in res_or_exc.statuses if s.limit == limit)


async def admitted(lim: Limiter, limits: list[Limit], amounts: dict[str, float], n: int) -> int:
    calls = (lim.reserve(limits, amounts) for _ in range(n))  # type: ignore[arg-type]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, LimitExceeded):
            raise r
    return sum(isinstance(r, Reservation) for r in results)


# --- exactness -----------------------------------------------------------------------------------


def test_concurrent_reservations_admit_exactly_k(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        lim = new_limiter(FakeClock())
        rpm = Limit("key:a", "requests", "minute", 7)
        assert await admitted(lim, [rpm], {"requests": 1}, 20) == 7
        tpm = Limit("key:b", "tokens", "minute", 1000)
        assert await admitted(lim, [tpm], {"tokens": 150}, 12) == 6  # 6 × 150 = 900; 7 would be 1050
        conc = Limit("key:c", "concurrent", None, 3)
        assert await admitted(lim, [conc], {}, 10) == 3
        await lim.aclose()

    run(body())


def test_fractional_spend_is_exact(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        lim = new_limiter(FakeClock())
        spend = Limit("tenant:t", "spend", "day", 0.3)
        for _ in range(3):
            await lim.reserve([spend], {"spend": 0.1})
        with pytest.raises(LimitExceeded):
            await lim.reserve([spend], {"spend": 0.1})
        await lim.aclose()

    run(body())


def test_denial_on_tenant_leaves_key_untouched(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        lim = new_limiter(FakeClock())
        key_rpm = Limit("key:k", "requests", "minute", 100)
        key_tpm = Limit("key:k", "tokens", "minute", 10_000)
        tenant_tpm = Limit("tenant:t", "tokens", "minute", 500)
        limits = [key_rpm, key_tpm, tenant_tpm]
        await lim.reserve(limits, {"requests": 1, "tokens": 400})
        with pytest.raises(LimitExceeded) as info:
            await lim.reserve(limits, {"requests": 1, "tokens": 200})
        assert info.value.limit == tenant_tpm
        assert status(info.value, key_rpm).remaining == 99  # the state before, untouched
        res = await lim.reserve([key_rpm, key_tpm], {"requests": 1, "tokens": 0})
        assert status(res, key_rpm).remaining == 98  # 1 + this one: the denial counted nothing
        assert status(res, key_tpm).remaining == 10_000 - 400
        await lim.aclose()

    run(body())


def test_exceeded_names_the_first_limit_crossed(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        lim = new_limiter(FakeClock())
        a = Limit("key:k", "tokens", "minute", 10)
        b = Limit("tenant:t", "tokens", "hour", 10)
        with pytest.raises(LimitExceeded) as info:
            await lim.reserve([a, b], {"tokens": 11})
        assert info.value.limit == a and info.value.impossible
        await lim.aclose()

    run(body())


# --- settle and extend ---------------------------------------------------------------------------


def test_settle_refunds_unused_tokens_and_is_idempotent(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        lim = new_limiter(FakeClock())
        tpm = Limit("key:k", "tokens", "minute", 1000)
        res = await lim.reserve([tpm], {"tokens": 800})
        with pytest.raises(LimitExceeded):
            await lim.reserve([tpm], {"tokens": 300})
        await lim.settle(res, {"tokens": 100})
        await lim.settle(res, {"tokens": 0})  # idempotent: the second settle changes nothing
        assert res.settled and res.amounts[tpm] == 100
        full = await lim.reserve([tpm], {"tokens": 900})  # 100 + 900 = exactly the limit
        assert status(full, tpm).remaining == 0
        with pytest.raises(LimitExceeded):
            await lim.reserve([tpm], {"tokens": 1})
        await lim.aclose()

    run(body())


def test_settle_counts_usage_beyond_the_reservation(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        lim = new_limiter(FakeClock())
        tpm = Limit("key:k", "tokens", "minute", 1000)
        spend = Limit("tenant:t", "spend", "month", 5.0)
        res = await lim.reserve([tpm, spend], {"tokens": 100})
        await lim.settle(res, {"tokens": 700, "spend": 2.5})
        nxt = await lim.reserve([tpm, spend], {"tokens": 0, "spend": 0})
        assert status(nxt, tpm).remaining == 300
        assert status(nxt, spend).remaining == pytest.approx(2.5)
        await lim.aclose()

    run(body())


def test_extend_and_denial_at_hard_cap(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        lim = new_limiter(FakeClock())
        tpm = Limit("key:k", "tokens", "minute", 1000)
        budget = Limit("tenant:t", "tokens", "day", 5000)
        res = await lim.reserve([tpm, budget], {"tokens": 600})
        assert await lim.extend(res, {"tokens": 300})
        assert res.amounts[tpm] == 900 and status(res, tpm).remaining == 100
        assert not await lim.extend(res, {"tokens": 200})  # would be 1100: the stream stops
        assert res.amounts[tpm] == 900  # the failed extend counted nothing
        other = await lim.reserve([tpm], {"tokens": 100})  # exactly fills the limit
        assert status(other, tpm).remaining == 0
        await lim.settle(res, {"tokens": 950})
        assert not await lim.extend(res, {"tokens": 1})  # settled reservations cannot grow
        await lim.aclose()

    run(body())


def test_refund_goes_to_the_window_it_was_counted_in(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        clock = FakeClock(ts(2025, 6, 15, 12, 0, 59))
        lim = new_limiter(clock)
        tpm = Limit("key:k", "tokens", "minute", 1000)
        old = await lim.reserve([tpm], {"tokens": 800})
        clock.now = ts(2025, 6, 15, 12, 1, 10)
        new = await lim.reserve([tpm], {"tokens": 1000})  # a new window: full capacity again
        await lim.settle(old, {"tokens": 0})  # refunds the 12:00 window, not 12:01
        with pytest.raises(LimitExceeded):
            await lim.reserve([tpm], {"tokens": 1})
        await lim.settle(new, {"tokens": 400})
        assert status(await lim.reserve([tpm], {"tokens": 600}), tpm).remaining == 0
        await lim.aclose()

    run(body())


def test_settle_deltas_refund_newest_window_first() -> None:
    tpm = Limit("key:k", "tokens", "minute", 10_000)
    t0 = ts(2025, 6, 15, 12, 0, 50)
    k0, k1 = counter_key(tpm, t0), counter_key(tpm, t0 + 20)
    res = _Res("r", (tpm,), {tpm: 900}, {tpm: k1[3]}, [], counted={k0: 500, k1: 400})
    assert settle_deltas(res, {"tokens": 300}, t0 + 30) == {k1: -400, k0: -200}
    assert res.counted == {k0: 300, k1: 0} and res.amounts[tpm] == 300


# --- concurrency leases --------------------------------------------------------------------------


def test_concurrency_lease_released_on_settle(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        lim = new_limiter(FakeClock())
        conc = Limit("key:k", "concurrent", None, 2)
        a = await lim.reserve([conc], {})
        await lim.reserve([conc], {})
        with pytest.raises(LimitExceeded) as info:
            await lim.reserve([conc], {})
        assert info.value.retry_after == 1 and status(info.value, conc).remaining == 0
        await lim.settle(a, {})
        await lim.settle(a, {})  # releasing twice frees one slot, not two
        await lim.reserve([conc], {})
        with pytest.raises(LimitExceeded):
            await lim.reserve([conc], {})
        await lim.aclose()

    run(body())


def test_crashed_workers_leases_expire(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        clock = FakeClock()
        crashed = new_limiter(clock, lease_ttl_s=30)
        conc = Limit("tenant:t", "concurrent", None, 2)
        await crashed.reserve([conc], {})
        held = await crashed.reserve([conc], {})
        # The worker dies without settling; another worker sees both slots taken until they expire.
        other = new_limiter(clock, lease_ttl_s=30)
        clock.now += 20
        assert await crashed.extend(held, {})  # the live request refreshes its lease
        clock.now += 15  # 35 s after reserve: the first lease expired, the refreshed one did not
        await other.reserve([conc], {})
        with pytest.raises(LimitExceeded):
            await other.reserve([conc], {})
        clock.now += 31
        assert await other.reserve([conc], {})
        await crashed.aclose()
        await other.aclose()

    run(body())


# --- windows -------------------------------------------------------------------------------------


def test_window_bounds_are_utc_calendar_windows() -> None:
    t = ts(2024, 2, 29, 23, 59, 59) + 0.5
    assert window_bounds("minute", t) == (ts(2024, 2, 29, 23, 59), ts(2024, 3, 1))
    assert window_bounds("hour", t) == (ts(2024, 2, 29, 23), ts(2024, 3, 1))
    assert window_bounds("day", t) == (ts(2024, 2, 29), ts(2024, 3, 1))
    assert window_bounds("month", t) == (ts(2024, 2, 1), ts(2024, 3, 1))
    assert window_bounds("month", ts(2024, 12, 31, 23, 59)) == (ts(2024, 12, 1), ts(2025, 1, 1))
    assert window_bounds("month", ts(2025, 1, 1)) == (ts(2025, 1, 1), ts(2025, 2, 1))


def test_minute_boundary_reset_and_retry_after(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        clock = FakeClock(ts(2025, 6, 15, 12, 0, 59) + 0.5)
        lim = new_limiter(clock)
        rpm = Limit("key:k", "requests", "minute", 2)
        res = await lim.reserve([rpm], {"requests": 1})
        assert status(res, rpm).reset_s == pytest.approx(0.5)
        await lim.reserve([rpm], {"requests": 1})
        with pytest.raises(LimitExceeded) as info:
            await lim.reserve([rpm], {"requests": 1})
        assert info.value.retry_after == 1 and not info.value.impossible
        clock.now = ts(2025, 6, 15, 12, 1, 0)  # the new minute starts empty
        res = await lim.reserve([rpm], {"requests": 1})
        assert status(res, rpm).reset_s == 60 and status(res, rpm).remaining == 1
        await lim.aclose()

    run(body())


def test_month_budget_resets_on_the_first(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        clock = FakeClock(ts(2024, 12, 31, 23, 59, 30))
        lim = new_limiter(clock)
        budget = Limit("tenant:t", "spend", "month", 10.0)
        res = await lim.reserve([budget], {"spend": 9.5})
        assert status(res, budget).reset_s == 30
        with pytest.raises(LimitExceeded) as info:
            await lim.reserve([budget], {"spend": 1.0})
        assert info.value.retry_after == 30
        clock.now = ts(2025, 1, 1, 0, 0, 1)
        res = await lim.reserve([budget], {"spend": 10.0})
        assert status(res, budget).reset_s == 31 * 86400 - 1
        with pytest.raises(LimitExceeded) as info:
            await lim.reserve([budget], {"spend": 0.01})
        assert info.value.retry_after == 31 * 86400 - 1
        await lim.aclose()

    run(body())


# --- failing closed ------------------------------------------------------------------------------


def test_redis_stopped_fails_closed() -> None:
    server = RedisServer()
    server.start()

    async def body() -> None:
        lim = RedisLimiter(server.url, timeout_s=1.0)
        rpm = Limit("key:k", "requests", "minute", 10)
        res = await lim.reserve([rpm], {"requests": 1})
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await lim.reserve([rpm], {"requests": 1})
        with pytest.raises(LimiterUnavailable):
            await lim.extend(res, {"tokens": 1})
        with pytest.raises(LimiterUnavailable):
            await lim.settle(res, {"requests": 0})
        assert not res.settled and time.monotonic() - t0 < 5
        await lim.aclose()

    try:
        run(body())
    finally:
        server.stop()


def test_redis_bad_url_fails_closed() -> None:
    with pytest.raises(LimiterUnavailable):
        RedisLimiter("notredis://127.0.0.1:1/0")

    async def body() -> None:
        lim = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1.0)
        with pytest.raises(LimiterUnavailable):
            await lim.reserve([Limit("key:k", "requests", "minute", 1)], {"requests": 1})
        await lim.aclose()

    run(body())


def test_sql_store_failure_fails_closed(tmp_path: Path) -> None:
    async def body() -> None:
        unmigrated = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        down = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
        for engine in (unmigrated, down):
            lim = SQLLimiter(engine)
            with pytest.raises(LimiterUnavailable):
                await lim.reserve([Limit("key:k", "requests", "minute", 1)], {"requests": 1})
            engine.dispose()

    run(body())


# --- several OS processes on one store -----------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from steward.gateway.limits import Limit, LimitExceeded, RedisLimiter, SQLLimiter
    from steward.store import make_engine

    store, url, attempts, limit, go_at, now = sys.argv[1:]

    async def main():
        clock = lambda: float(now)
        if store == "redis":
            lim = RedisLimiter(url, clock=clock)
        else:
            lim = SQLLimiter(make_engine(url), clock=clock)
        rpm = Limit("tenant:shared", "requests", "minute", float(limit))
        while time.time() < float(go_at):
            await asyncio.sleep(0.002)
        results = []
        for _ in range(int(attempts) // 5):  # concurrent batches, spread out so the processes interleave
            batch = (lim.reserve([rpm], {"requests": 1}) for _ in range(5))
            results += await asyncio.gather(*batch, return_exceptions=True)
            await asyncio.sleep(0.005)
        errors = [repr(r) for r in results if isinstance(r, Exception) and not isinstance(r, LimitExceeded)]
        admitted = sum(not isinstance(r, BaseException) for r in results)
        print(json.dumps({"admitted": admitted, "errors": errors}))
        await lim.aclose()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("store", ["sqlite", "postgres", "redis"])
def test_two_processes_admit_exactly_n(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if store == "sqlite":
        url = f"sqlite:///{tmp_path / 'shared.db'}"
        upgrade(url).dispose()
    elif store == "postgres":
        url = request.getfixturevalue("fresh_pg_url")
        upgrade(url).dispose()
    else:
        url = request.getfixturevalue("fresh_redis_url")
    limit, attempts = 20, 15  # 30 attempts: whoever starts first cannot take all 20
    go_at = time.time() + 2.5  # both start together, after their imports
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, store, url, str(attempts), str(limit), str(go_at), str(NOON)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    reports = [json.loads(out) for out, _ in outs]
    assert [r["errors"] for r in reports] == [[], []]
    assert sum(r["admitted"] for r in reports) == limit  # not 2 × limit, not fewer
    assert all(r["admitted"] >= limit - attempts for r in reports)


# --- headers and the factory ---------------------------------------------------------------------


def test_format_reset() -> None:
    assert format_reset(0) == "0s"
    assert format_reset(0.017) == "17ms"
    assert format_reset(1) == "1s"
    assert format_reset(1.2) == "2s"
    assert format_reset(360) == "6m0s"
    assert format_reset(3725) == "1h2m5s"


def test_ratelimit_headers_pick_the_binding_limit() -> None:
    key_rpm = Limit("key:k", "requests", "minute", 60)
    tenant_rpm = Limit("tenant:t", "requests", "minute", 600)
    key_tpm = Limit("key:k", "tokens", "minute", 10_000)
    day_tokens = Limit("tenant:t", "tokens", "day", 1_000_000)
    conc = Limit("key:k", "concurrent", None, 4)
    statuses = [
        LimitStatus(key_rpm, 59, 12.5),
        LimitStatus(tenant_rpm, 100, 12.5),
        LimitStatus(key_tpm, 9_000.7, 12.5),
        LimitStatus(day_tokens, 500.0, 3600.0),  # the day budget binds before the minute does
        LimitStatus(conc, 3, 0),
    ]
    assert ratelimit_headers(statuses) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "13s",
        "x-ratelimit-limit-tokens": "1000000",
        "x-ratelimit-remaining-tokens": "500",
        "x-ratelimit-reset-tokens": "1h0m0s",
    }
    assert ratelimit_headers([LimitStatus(conc, 3, 0)]) == {}


def test_make_limiter_never_multiplies_limits(tmp_path: Path) -> None:
    assert isinstance(make_limiter(None, None, 1), MemoryLimiter)
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(make_limiter(None, engine, 2), SQLLimiter)
    assert isinstance(make_limiter("redis://127.0.0.1:1/0", engine, 4), RedisLimiter)
    with pytest.raises(ValueError, match="workers"):
        make_limiter(None, None, 2)
    with pytest.raises(ValueError, match="in-memory"):
        make_limiter(None, make_engine("sqlite:///:memory:"), 2)


def test_limit_validation() -> None:
    with pytest.raises(ValueError):
        Limit("key:k", "requests", None, 1)
    with pytest.raises(ValueError):
        Limit("key:k", "concurrent", "minute", 1)
    with pytest.raises(ValueError):
        Limit("key:k", "tokens", "minute", -1)
    with pytest.raises(ValueError):
        Limit("key:k", "tokens", "week", 1)  # type: ignore[arg-type]
    assert math.isfinite(Limit("key:k", "tokens", "minute", 0).limit)


# --- housekeeping --------------------------------------------------------------------------------


def test_no_limits_means_no_store_round_trip(new_limiter: NewLimiter) -> None:
    async def body() -> None:
        lim = new_limiter(FakeClock())
        res = await lim.reserve([], {"requests": 1, "tokens": 100})
        assert res.statuses == [] and await lim.extend(res, {"tokens": 5})
        await lim.settle(res, {"tokens": 3})
        assert res.settled
        await lim.aclose()

    run(body())


def test_memory_limiter_is_exact_across_threads() -> None:
    lim = MemoryLimiter(clock=FakeClock())
    rpm = Limit("key:k", "requests", "minute", 25)
    counts: list[int] = []

    def worker() -> None:
        counts.append(asyncio.run(admitted(lim, [rpm], {"requests": 1}, 10)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 25


def test_redis_keys_expire_after_their_window(fresh_redis_url: str) -> None:
    async def body() -> None:
        lim = RedisLimiter(fresh_redis_url, clock=FakeClock(ts(2025, 6, 15, 12, 0, 30)), lease_ttl_s=30)
        await lim.reserve(
            [Limit("key:k", "tokens", "minute", 10), Limit("key:k", "concurrent", None, 1)], {"tokens": 1}
        )
        await lim.aclose()

    run(body())
    client = redis.Redis.from_url(fresh_redis_url, decode_responses=True)
    try:
        ttls = {k: client.pttl(k) for k in client.keys("*")}
    finally:
        client.close()
    assert len(ttls) == 2
    for key, ttl in ttls.items():
        assert 0 < ttl <= 91_000, key  # 30 s left in the window (or lease) + 60 s grace


def test_redis_settle_markers_expire_and_only_settles_that_change_counters_leave_one(
    fresh_redis_url: str,
) -> None:
    from steward.gateway.limits.retry import SETTLED_MARKER_TTL_S

    async def body() -> str:
        lim = RedisLimiter(fresh_redis_url, clock=FakeClock())
        rpm, tpm = Limit("key:k", "requests", "minute", 10), Limit("key:k", "tokens", "minute", 100)
        plain = await lim.reserve([rpm, Limit("key:k", "concurrent", None, 1)], {"requests": 1})
        await lim.settle(plain, {"requests": 1})  # nothing to adjust: no marker
        refunded = await lim.reserve([tpm], {"tokens": 50})
        await lim.settle(refunded, {"tokens": 10})
        await lim.aclose()
        return refunded.id

    refunded_id = run(body())
    client = redis.Redis.from_url(fresh_redis_url, decode_responses=True)
    try:
        markers = {k: client.pttl(k) for k in client.keys("stw:lim:s:*")}
    finally:
        client.close()
    assert list(markers) == [f"stw:lim:s:{refunded_id}"]
    assert (
        SETTLED_MARKER_TTL_S * 1000 - 60_000
        < markers[f"stw:lim:s:{refunded_id}"]
        <= SETTLED_MARKER_TTL_S * 1000
    )


def test_sql_limiter_drops_ended_windows_and_expired_leases(tmp_path: Path) -> None:
    engine = upgrade(f"sqlite:///{tmp_path / 'clean.db'}")
    clock = FakeClock()

    async def body() -> None:
        lim = SQLLimiter(engine, clock=clock, lease_ttl_s=10)
        limits = [Limit("key:k", "requests", "minute", 5), Limit("key:k", "concurrent", None, 5)]
        await lim.reserve(limits, {"requests": 1})  # never settled: a crashed request
        tpm = Limit("key:k", "tokens", "minute", 100)
        await lim.settle(await lim.reserve([tpm], {"tokens": 50}), {"tokens": 10})  # leaves a marker
        assert markers() == 1
        clock.now += 86400
        await lim.reserve([Limit("key:j", "requests", "minute", 5)], {"requests": 1})
        await lim.aclose()

    def markers() -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM limit_settled")).scalar() or 0)

    try:
        run(body())
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT scope FROM limit_counters")).scalars().all()
            leases = conn.execute(text("SELECT count(*) FROM limit_leases")).scalar()
        assert rows == ["key:j"] and leases == 0 and markers() == 0
    finally:
        engine.dispose()


# --- persistence, lost leases and settles that fail --------------------------------------------------


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_make_limiter_shares_limits_and_keeps_budgets_on_a_persistent_database(
    db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """One worker per process, several processes (replicas) on one database: every limiter counts in
    the database, so they share the limit, and a budget outlives a restart."""
    url = (
        f"sqlite:///{tmp_path / 'steward.db'}" if db == "sqlite" else request.getfixturevalue("fresh_pg_url")
    )
    engine = upgrade(url)
    rpd = Limit("tenant:acme", "requests", "day", 3)
    spend = Limit("tenant:acme", "spend", "month", 1.0)

    async def first_run() -> None:
        a, b = make_limiter(None, engine, 1), make_limiter(None, engine, 1)  # two gateway processes
        assert (
            await admitted(a, [rpd], {"requests": 1}, 2) + await admitted(b, [rpd], {"requests": 1}, 3) == 3
        )
        res = await a.reserve([spend], {"spend": 0.5})
        await a.settle(res, {"spend": 0.9})
        await a.aclose()
        await b.aclose()

    async def after_restart() -> None:
        c = make_limiter(None, engine, 1)
        with pytest.raises(LimitExceeded):
            await c.reserve([rpd], {"requests": 1})
        with pytest.raises(LimitExceeded):
            await c.reserve([spend], {"spend": 0.2})  # 0.9 of 1.0 is spent: it did not reset
        await c.reserve([spend], {"spend": 0.1})
        await c.aclose()

    try:
        run(first_run())
        run(after_restart())
    finally:
        engine.dispose()
    memory_db = make_engine("sqlite:///:memory:")
    assert isinstance(make_limiter(None, memory_db, 1), MemoryLimiter)  # nobody else can see it


def test_a_late_lease_refresh_does_not_take_back_a_reclaimed_slot(new_limiter: NewLimiter) -> None:
    """A refresh that comes after its lease expired (a store outage, a stalled loop) must not put
    the lease back over another request's: it reports the lease lost, unless the limit has room."""

    async def body() -> None:
        clock = FakeClock()
        lim = new_limiter(clock, lease_ttl_s=10)
        conc = [Limit("tenant:a", "concurrent", None, 1)]
        a = await lim.reserve(conc, {})
        assert await lim.extend(a, {})  # on time: refreshed
        clock.now += 11  # the next refresh is late: a's lease has expired
        b = await lim.reserve(conc, {})  # the freed slot is b's
        assert await lim.extend(a, {}) is False
        with pytest.raises(LimitExceeded):
            await lim.reserve(conc, {})  # still one slot held, by b
        await lim.settle(b, {})
        assert await lim.extend(a, {}) is True  # room again: a's lease is taken back
        with pytest.raises(LimitExceeded):
            await lim.reserve(conc, {})
        await lim.settle(a, {})
        await lim.settle(await lim.reserve(conc, {}), {})
        await lim.aclose()

    run(body())


def _fail_settles(lim: Limiter, times: int) -> None:
    """Make the store fail the next `times` settles of `lim`, as an outage would."""
    left = [times]
    if isinstance(lim, SQLLimiter):
        from sqlalchemy.exc import OperationalError

        real_sync = lim._settle_sync

        def failing_sync(*args: Any) -> None:
            if left[0] > 0:
                left[0] -= 1
                raise OperationalError("COMMIT", None, Exception("server closed the connection"))
            real_sync(*args)

        lim._settle_sync = failing_sync  # type: ignore[method-assign]
    else:
        assert isinstance(lim, RedisLimiter)
        real_script = lim._settle

        async def failing_script(**kw: Any) -> Any:
            if left[0] > 0:
                left[0] -= 1
                raise redis.exceptions.ConnectionError("Connection refused")
            return await real_script(**kw)

        lim._settle = failing_script  # type: ignore[assignment]


@pytest.mark.parametrize("new_limiter", ["sqlite", "postgres", "redis"], indirect=True)  # memory cannot fail
def test_a_settle_that_fails_is_retried_in_the_background_and_at_shutdown(new_limiter: NewLimiter) -> None:
    """A settle refused by a short store outage must not leak its concurrency slot until the lease
    TTL nor leave the whole reservation charged: it is retried, and tried again when closing."""
    clock = FakeClock()
    conc = Limit("tenant:a", "concurrent", None, 1)
    tokens = Limit("tenant:a", "tokens", "day", 1000)

    async def body() -> None:
        lim = new_limiter(clock)
        retry = getattr(lim, "settle_retry", None)
        if retry is not None:
            retry._first_s = 0.02  # retry quickly
        res = await lim.reserve([conc, tokens], {"tokens": 800})
        _fail_settles(lim, 2)
        with pytest.raises(LimiterUnavailable):
            await lim.settle(res, {"tokens": 10})
        assert not res.settled
        for _ in range(250):
            if res.settled:
                break
            await asyncio.sleep(0.02)
        assert res.settled
        # the slot is free and 790 of the 800 reserved tokens came back: 990 more fit
        await lim.settle(await lim.reserve([conc, tokens], {"tokens": 990}), {"tokens": 990})
        await lim.aclose()

    async def shutdown() -> None:
        lim = new_limiter(clock)
        retry = getattr(lim, "settle_retry", None)
        if retry is not None:
            retry._first_s = 60.0  # no background retry before the shutdown
        res = await lim.reserve([Limit("tenant:b", "concurrent", None, 1)], {})
        _fail_settles(lim, 1)
        with pytest.raises(LimiterUnavailable):
            await lim.settle(res, {})
        await lim.aclose()  # the gateway's shutdown: one more try
        assert res.settled
        other = new_limiter(clock)  # another process: the slot is free
        await other.settle(await other.reserve([Limit("tenant:b", "concurrent", None, 1)], {}), {})
        await other.aclose()

    run(body())
    run(shutdown())


def _lose_settle_replies(lim: Limiter, times: int) -> None:
    """Let the next `times` settles of `lim` reach the store and then lose the reply, as a PostgreSQL
    connection dropped during COMMIT, or a Redis reply lost after the script ran, would."""
    left = [times]
    if isinstance(lim, SQLLimiter):
        from sqlalchemy.exc import OperationalError

        dialect = lim._engine.dialect
        real_commit = dialect.do_commit

        def commit_then_lose_reply(dbapi_conn: Any) -> None:
            real_commit(dbapi_conn)
            if left[0] > 0:
                left[0] -= 1
                raise OperationalError("COMMIT", None, Exception("server closed the connection"))

        dialect.do_commit = commit_then_lose_reply  # type: ignore[method-assign]
    else:
        assert isinstance(lim, RedisLimiter)
        real_script = lim._settle

        async def run_then_lose_reply(**kw: Any) -> Any:
            reply = await real_script(**kw)
            if left[0] > 0:
                left[0] -= 1
                raise redis.exceptions.ConnectionError("Connection reset by peer")
            return reply

        lim._settle = run_then_lose_reply  # type: ignore[assignment]


async def _tokens_used(lim: Limiter, tokens: Limit) -> float:
    """What the store has counted on `tokens`' counter (a reservation of 0 that is never settled)."""
    return tokens.limit - status(await lim.reserve([tokens], {"tokens": 0}), tokens).remaining


@pytest.mark.parametrize("new_limiter", ["sqlite", "postgres", "redis"], indirect=True)
def test_a_settle_whose_reply_was_lost_is_applied_once(new_limiter: NewLimiter) -> None:
    """The settle went through but its caller saw a store failure and queued it: the retry (at
    shutdown, or in the background) must find it applied and change nothing."""
    clock = FakeClock()
    tokens = Limit("tenant:a", "tokens", "day", 1000)
    conc = Limit("tenant:a", "concurrent", None, 1)

    async def at_shutdown() -> None:  # a refund (actual < reserved), the usual case
        lim = new_limiter(clock)
        res = await lim.reserve([tokens, conc], {"tokens": 100})
        _lose_settle_replies(lim, 1)
        with pytest.raises(LimiterUnavailable):
            await lim.settle(res, {"tokens": 10})
        assert not res.settled and res.id in lim.settle_retry  # type: ignore[attr-defined]
        await lim.aclose()  # the retry
        assert res.settled
        other = new_limiter(clock)
        assert await _tokens_used(other, tokens) == 10  # not 0: refunded once
        await other.settle(await other.reserve([conc], {}), {})  # the slot was released
        await other.aclose()

    async def in_the_background() -> None:  # usage beyond the reservation
        lim = new_limiter(clock)
        lim.settle_retry._first_s = 0.02  # type: ignore[attr-defined]
        res = await lim.reserve([tokens], {"tokens": 100})
        _lose_settle_replies(lim, 1)
        with pytest.raises(LimiterUnavailable):
            await lim.settle(res, {"tokens": 300})
        for _ in range(250):
            if res.settled:
                break
            await asyncio.sleep(0.02)
        assert res.settled
        assert await _tokens_used(lim, tokens) == 10 + 300  # not 10 + 500: charged once
        await lim.aclose()

    run(at_shutdown())
    run(in_the_background())


@pytest.mark.parametrize("new_limiter", ["sqlite", "postgres", "redis"], indirect=True)
def test_a_settle_then_a_retry_of_the_same_reservation_applies_once(new_limiter: NewLimiter) -> None:
    """The store, not the caller's copy of the reservation, decides that a settle was applied: a
    retry of a reservation that settled (from a copy taken before, e.g. a queued retry) is a no-op."""
    import copy

    tokens = Limit("tenant:a", "tokens", "day", 1000)

    async def body() -> None:
        lim = new_limiter(FakeClock())
        res = await lim.reserve([tokens], {"tokens": 100})
        stale = copy.deepcopy(res)
        await lim.settle(res, {"tokens": 10})
        assert res.settled and not stale.settled
        lim.settle_retry.add(stale, {"tokens": 10})  # type: ignore[attr-defined]
        await lim.aclose()  # the retry
        assert stale.settled
        other = new_limiter(FakeClock())
        assert await _tokens_used(other, tokens) == 10  # not 0: refunded once
        await other.aclose()

    run(body())


def test_sql_limiter_waiting_for_the_write_lock_does_not_starve_other_threads(tmp_path: Path) -> None:
    """Limiter calls parked on a held SQLite write lock use the limiter's own threads, so asyncio's
    default executor (the hf backend's tokenising, off-loop backend calls) stays free."""
    import contextlib
    import os
    import sqlite3

    engine = upgrade(f"sqlite:///{tmp_path / 'steward.db'}")
    rpm = Limit("key:a", "requests", "minute", 1e9)
    default_threads = min(32, (os.cpu_count() or 1) + 4)
    locked = threading.Event()
    release = threading.Event()

    def hold_write_lock() -> None:
        conn = sqlite3.connect(str(engine.url.database))
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        conn.rollback()
        conn.close()

    async def body() -> None:
        lim = SQLLimiter(engine)
        holder = threading.Thread(target=hold_write_lock)
        holder.start()
        try:
            assert locked.wait(5)
            calls = [
                asyncio.create_task(lim.reserve([rpm], {"requests": 1})) for _ in range(default_threads + 4)
            ]
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            with contextlib.suppress(TimeoutError):  # starved: the lock is only released below
                await asyncio.wait_for(asyncio.to_thread(lambda: None), 3)
            waited = time.perf_counter() - t0
            assert not any(c.done() for c in calls)  # still waiting for the lock
        finally:
            release.set()
            holder.join()
        assert waited < 1.0, f"an unrelated asyncio.to_thread call waited {waited:.2f} s"
        for res in await asyncio.gather(*calls):
            await lim.settle(res, {"requests": 1})
        await lim.aclose()
        assert lim._executor is None  # its threads are stopped at close

    try:
        run(body())
    finally:
        engine.dispose()


def test_redis_without_persistence_warns_once_when_budgets_are_used(
    fresh_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from redis.exceptions import ResponseError

    client = redis.Redis.from_url(fresh_redis_url, decode_responses=True)
    saved = client.config_get("appendonly")["appendonly"], client.config_get("save")["save"]
    client.config_set("appendonly", "no")
    client.config_set("save", "")
    tokens = Limit("key:k", "tokens", "day", 100)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "persistence" in r.getMessage()]

    async def body() -> None:
        lim = RedisLimiter(fresh_redis_url)
        await lim.reserve([Limit("key:k", "requests", "minute", 5)], {"requests": 1})
        assert warnings() == []  # no budget configured: nothing to lose
        await lim.reserve([tokens], {"tokens": 1})
        await lim.reserve([Limit("key:k", "spend", "day", 5)], {"spend": 1})
        assert len(warnings()) == 1 and "restart" in warnings()[0]
        await lim.aclose()

        client.config_set("save", "3600 1")
        persistent = RedisLimiter(fresh_redis_url)
        assert await persistent.check_persistence() is True
        await persistent.aclose()

        managed = RedisLimiter(fresh_redis_url)  # CONFIG disabled: tolerated

        async def refuse(*args: Any, **kw: Any) -> Any:
            raise ResponseError("unknown command 'CONFIG'")

        managed._redis.config_get = refuse  # type: ignore[method-assign]
        await managed.reserve([tokens], {"tokens": 1})
        assert await managed.check_persistence() is None
        await managed.aclose()

    try:
        with caplog.at_level(logging.INFO, logger="steward.gateway.limits"):
            run(body())
    finally:
        client.config_set("appendonly", saved[0])
        client.config_set("save", saved[1])
        client.close()
    assert len(warnings()) == 1


def test_settle_retry_is_bounded_backs_off_and_never_settles_twice() -> None:
    from steward.gateway.limits.retry import SettleRetry

    calls: list[tuple[str, float]] = []
    failing = [True]

    async def settle_once(res: Reservation, actual: Any) -> None:
        calls.append((res.id, actual.get("tokens", 0)))
        await asyncio.sleep(0)
        if failing[0]:
            raise LimiterUnavailable("down")
        res.settled = True

    async def body() -> None:
        retry = SettleRetry(settle_once, max_pending=2, first_s=0.01, max_s=0.04)
        a, b, c = (_Res(f"r{i}", [], {}, {}, []) for i in range(3))
        retry.add(a, {"tokens": 1})
        retry.add(b, {"tokens": 1})
        retry.add(c, {"tokens": 1})  # over the bound: dropped, not queued
        assert len(retry) == 2 and "r2" not in retry
        retry.add(a, {"tokens": 5})  # queued again: one entry, the latest usage
        assert len(retry) == 2
        await asyncio.sleep(0.2)
        tries = len(calls)
        assert 4 <= tries < 40  # retried, with backoff (not a busy loop)
        failing[0] = False
        for _ in range(50):
            if a.settled and b.settled:
                break
            await asyncio.sleep(0.02)
        assert a.settled and b.settled and len(retry) == 0
        assert ("r0", 5) in calls and ("r2", 1) not in calls
        n = len(calls)
        retry.add(a, {"tokens": 9})  # settled already: nothing to do
        assert len(retry) == 0 and await retry.flush() == 0 and len(calls) == n

    run(body())


def test_the_lease_refresher_reports_a_lost_lease(caplog: pytest.LogCaptureFixture) -> None:
    """A refresh that finds its lease gone (expired and taken) is said in the log, once, and the
    refresher stops; it used to be ignored silently."""
    from steward.gateway.service import _Hold

    class Lost:
        calls = 0

        async def extend(self, res: Reservation, amounts: Mapping[str, float]) -> bool:
            Lost.calls += 1
            return False

    async def body() -> None:
        res = Reservation("r1", (), {}, {}, [])
        hold = _Hold(Lost(), res, 0.01, 5.0)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        await hold.stop()

    with caplog.at_level(logging.WARNING, logger="steward.gateway"):
        run(body())
    lost = [r for r in caplog.records if "lease was lost" in r.getMessage()]
    assert len(lost) == 1 and Lost.calls == 1
