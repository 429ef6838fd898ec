"""Exact rate limits and budgets: reserve before the backend runs, settle the real usage after.

Three stores share one contract (`Limiter`): `MemoryLimiter` for one process, `RedisLimiter` (one
atomic Lua script) for any number of processes on one Redis, `SQLLimiter` (the gateway's database)
whenever that database is persistent and there is no Redis. `make_limiter` picks the one that cannot
over-admit for the deployment and keeps budgets across restarts;
every store failure raises `LimiterUnavailable` so the gateway fails closed.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from steward.gateway.limits.base import (
    DEFAULT_LEASE_TTL_S,
    Clock,
    Kind,
    Limit,
    Limiter,
    LimiterUnavailable,
    LimitExceeded,
    LimitStatus,
    Reservation,
    Window,
    format_reset,
    ratelimit_headers,
    window_bounds,
)
from steward.gateway.limits.memory import MemoryLimiter
from steward.gateway.limits.redis_limiter import RedisLimiter
from steward.gateway.limits.sql import SQLLimiter

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "Clock",
    "Kind",
    "Limit",
    "LimitExceeded",
    "LimitStatus",
    "Limiter",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RedisLimiter",
    "Reservation",
    "SQLLimiter",
    "Window",
    "format_reset",
    "make_limiter",
    "ratelimit_headers",
    "window_bounds",
]


def make_limiter(
    redis_url: str | None,
    engine: Engine | None,
    workers: int,
    *,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
) -> Limiter:
    """Redis if a URL is given; else the database whenever it is persistent; else memory.

    A persistent database (PostgreSQL, or SQLite in a file) always holds the limits, whatever
    `workers` is: other gateway processes (replicas, or several `--workers 1` servers) may share it,
    and budgets (a monthly spend) must survive a restart. Memory is only for no database or an
    in-memory SQLite one, neither of which another process can see. Several workers there would
    each count alone (N× the limit), so that is a `ValueError` the server turns into a refusal to start.
    """
    if redis_url:
        return RedisLimiter(redis_url, lease_ttl_s=lease_ttl_s)
    persistent = engine is not None and not (
        engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:")
    )
    if persistent:
        assert engine is not None
        return SQLLimiter(engine, lease_ttl_s=lease_ttl_s)
    if workers > 1:
        if engine is None:
            raise ValueError("--workers > 1 needs STEWARD_REDIS_URL or a database for exact limits")
        raise ValueError("--workers > 1 cannot share limits through an in-memory SQLite database")
    return MemoryLimiter(lease_ttl_s=lease_ttl_s)
