"""Limits shared by every gateway process through one Redis: one Lua script per decision.

Redis runs a script to completion before any other command, so the script that reads every counter,
decides and increments them is atomic across all replicas: a limit of N admits exactly N. Counters are
plain float keys named by (scope, kind, window, window start) that expire a minute after their window
ends; concurrency is a sorted set per scope of lease ids scored by their expiry, so the leases of a
crashed worker drop out by themselves and the set's TTL is refreshed with every lease. A settle that
adjusts counters sets a marker key for its reservation in the same script (expiring by itself after
`SETTLED_MARKER_TTL_S`), so a retry of a settle whose reply was lost applies nothing.

Window starts and lease expiries come from the client's clock (injectable for tests; replicas are
assumed NTP-synchronised) because calendar months are awkward in Lua. The keys are not hash-tagged, so
this needs one Redis (or a primary), not Redis Cluster.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from steward.gateway.limits.base import (
    DEFAULT_LEASE_TTL_S,
    EPSILON,
    Clock,
    CounterKey,
    Entry,
    Kind,
    Limit,
    LimiterUnavailable,
    LimitStatus,
    Reservation,
    decide,
    exceeded,
    extension_entries,
    merge_statuses,
    new_reservation,
    plan,
    record,
    settle_deltas,
    window_end,
)
from steward.gateway.limits.retry import SETTLED_MARKER_TTL_S, RetriedSettle, SettleRetry

log = logging.getLogger("steward.gateway.limits")
_BUDGETS = ("tokens", "spend")  # what a Redis restart without persistence would silently reset
_GRACE_S = 60  # keys outlive their window a little so a late settle still finds them

# KEYS: the distinct keys. ARGV: now, epsilon, check_leases (1/0), lease expiry, lease TTL ms, n, then
# per entry five values: key index, type ("c" counter / "l" lease), limit, amount (counter) or lease id
# (lease), TTL ms. Returns {failed entry index or 0, value before this call per entry as a string}.
_CHECK_AND_ADD = """
local now = tonumber(ARGV[1])
local eps = tonumber(ARGV[2])
local check_leases = ARGV[3] == '1'
local lease_expiry = ARGV[4]
local n = tonumber(ARGV[6])
local used = {}
local failed = 0
for i = 1, n do
  local b = 6 + (i - 1) * 5
  local key = KEYS[tonumber(ARGV[b + 1])]
  local limit = tonumber(ARGV[b + 3])
  local u
  if ARGV[b + 2] == 'c' then
    u = tonumber(redis.call('GET', key) or '0')
    if failed == 0 and u + tonumber(ARGV[b + 4]) > limit + eps then failed = i end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    u = redis.call('ZCARD', key)
    -- A refresh (check_leases off) extends a live lease unchecked; one that expired was dropped
    -- just above and may have been reclaimed, so it is taken again only if the limit has room.
    local held = (not check_leases) and redis.call('ZSCORE', key, ARGV[b + 4])
    if failed == 0 and not held and u + 1 > limit + eps then failed = i end
  end
  used[i] = tostring(u)
end
if failed == 0 then
  local done = {}
  for i = 1, n do
    local b = 6 + (i - 1) * 5
    local key = KEYS[tonumber(ARGV[b + 1])]
    if not done[key] then
      done[key] = true
      if ARGV[b + 2] == 'c' then
        if tonumber(ARGV[b + 4]) ~= 0 then
          redis.call('INCRBYFLOAT', key, ARGV[b + 4])
          redis.call('PEXPIRE', key, ARGV[b + 5])
        end
      else
        redis.call('ZADD', key, lease_expiry, ARGV[b + 4])
        redis.call('PEXPIRE', key, ARGV[5])
      end
    end
  end
end
table.insert(used, 1, failed)
return used
"""

# KEYS: the reservation's settled marker if there are counters to adjust, the counter keys, then lease
# sets. ARGV: the marker's TTL ms ("0": no counters, no marker), number of counters, per counter (delta,
# TTL ms), then one lease id per lease set. Refunds only touch keys that still exist and never go below
# zero. Counter deltas are not idempotent: if the marker exists (an earlier run of this settle whose
# reply was lost) nothing is applied and 0 is returned. Removing a lease is idempotent by itself.
_SETTLE = """
local first = 1
if ARGV[1] ~= '0' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
  first = 2
end
local nc = tonumber(ARGV[2])
for i = 1, nc do
  local key = KEYS[first + i - 1]
  local d = tonumber(ARGV[2 * i + 1])
  if d > 0 then
    redis.call('INCRBYFLOAT', key, ARGV[2 * i + 1])
    redis.call('PEXPIRE', key, ARGV[2 * i + 2])
  elseif d < 0 and redis.call('EXISTS', key) == 1 then
    if tonumber(redis.call('INCRBYFLOAT', key, ARGV[2 * i + 1])) < 0 then
      redis.call('SET', key, '0', 'KEEPTTL')
    end
  end
end
for j = first + nc, #KEYS do
  redis.call('ZREM', KEYS[j], ARGV[2 * nc + 2 + (j - first - nc + 1)])
end
return 1
"""


def _num(x: float) -> str:
    return repr(float(x))


class RedisLimiter(RetriedSettle):
    """Exact limits across processes on one Redis; any Redis failure raises `LimiterUnavailable`."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = time.time,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        prefix: str = "stw:lim",
        timeout_s: float = 2.0,
    ) -> None:
        try:
            # No retries: a limiter that cannot answer at once should refuse, not stall the request.
            self._redis: aioredis.Redis = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
        except (ValueError, RedisError) as exc:
            raise LimiterUnavailable(f"invalid Redis URL ({exc})") from None
        self._clock = clock
        self._lease_ttl_s = lease_ttl_s
        self.settle_retry = SettleRetry(self._settle_once)
        self._prefix = prefix
        self._check = self._redis.register_script(_CHECK_AND_ADD)
        self._settle = self._redis.register_script(_SETTLE)
        self._persistence_checked = False

    async def check_persistence(self) -> bool | None:
        """Whether Redis persists its data (AOF or RDB snapshots); None if it will not say.

        Without persistence a Redis restart empties every counter, so spend and token budgets start
        over silently. Called once, on the first reservation with such a budget (the limits live
        in the tenants' records, not in the settings), and logs a warning if they are not durable.
        A managed Redis that disables CONFIG answers an error: that is tolerated, not a failure.
        """
        try:
            aof = await self._redis.config_get("appendonly")
            save = await self._redis.config_get("save")
        except ResponseError:  # CONFIG renamed or disabled (managed Redis): cannot tell
            self._persistence_checked = True
            log.info("Redis does not allow CONFIG GET; cannot check that budgets survive a restart")
            return None
        except (RedisError, OSError):
            return None  # not reachable now: try again with the next budgeted reservation
        self._persistence_checked = True
        persistent = str(aof.get("appendonly") or "no").lower() != "no" or bool(
            str(save.get("save") or "").strip()
        )
        if not persistent:
            log.warning(
                'Redis has no persistence (appendonly no, save ""): a Redis restart resets every '
                "spend and token budget to zero. Enable AOF or RDB snapshots on the limits' Redis."
            )
        return persistent

    def _counter(self, key: CounterKey) -> str:
        scope, kind, window, start = key
        return f"{self._prefix}:c:{kind}:{window}:{start}:{scope}"

    def _lease_set(self, scope: str) -> str:
        return f"{self._prefix}:l:{scope}"

    def _settled_marker(self, reservation_id: str) -> str:
        return f"{self._prefix}:s:{reservation_id}"

    def _ttl_ms(self, key: CounterKey, now: float) -> int:
        end = window_end(key[2], key[3])  # type: ignore[arg-type]
        return max(1000, math.ceil((end - now + _GRACE_S) * 1000))

    async def _run(
        self, entries: Sequence[Entry], leases: Mapping[str, str], now: float, *, check_leases: bool
    ) -> tuple[Entry | None, list[LimitStatus]]:
        keys: list[str] = []
        index: dict[str, int] = {}
        args: list[Any] = []
        for e in entries:
            name = self._lease_set(e.limit.scope) if e.key is None else self._counter(e.key)
            if name not in index:
                keys.append(name)
                index[name] = len(keys)
            if e.key is None:
                args += [index[name], "l", _num(e.limit.limit), leases[e.limit.scope], 0]
            else:
                args += [index[name], "c", _num(e.limit.limit), _num(e.amount), self._ttl_ms(e.key, now)]
        head = [
            _num(now),
            _num(EPSILON),
            1 if check_leases else 0,
            _num(now + self._lease_ttl_s),
            math.ceil((self._lease_ttl_s + _GRACE_S) * 1000),
            len(entries),
        ]
        try:
            reply = await self._check(keys=keys, args=head + args)
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"Redis limiter failed: {type(exc).__name__}") from exc
        failed_at = int(reply[0])
        used: dict[CounterKey, float] = {}
        live: dict[str, int] = {}
        for e, value in zip(entries, reply[1:], strict=True):
            if e.key is None:
                live[e.limit.scope] = int(float(value))
            else:
                used[e.key] = float(value)
        failed, statuses = decide(entries, used, live, now, check_leases=check_leases)
        # The script is the authority; `decide` repeats its arithmetic only to build the statuses.
        if failed_at and failed is None:
            failed = entries[failed_at - 1]
        elif not failed_at:
            failed = None
        return failed, statuses

    async def reserve(self, limits: Sequence[Limit], amounts: Mapping[Kind, float]) -> Reservation:
        if not limits:  # most tenants have no limits: no round trip to Redis
            return new_reservation([], [])
        if not self._persistence_checked and any(lim.kind in _BUDGETS for lim in limits):
            await self.check_persistence()
        now = self._clock()
        entries = plan(limits, amounts, now)
        res = new_reservation(entries, [])  # nothing is counted until the script admits it
        failed, statuses = await self._run(entries, res.leases, now, check_leases=True)
        if failed is not None:
            raise exceeded(failed, statuses, now)
        res.statuses = statuses
        return res

    async def extend(self, reservation: Reservation, amounts: Mapping[Kind, float]) -> bool:
        if reservation.settled:
            return False
        if not reservation.limits:
            return True
        now = self._clock()
        entries = extension_entries(reservation, amounts, now)
        # Lease entries ride along so the same script refreshes their expiry (never denied here).
        lease_entries = [Entry(lim, None, 1.0) for lim in reservation.limits if lim.kind == "concurrent"]
        failed, statuses = await self._run(
            entries + lease_entries, reservation.leases, now, check_leases=False
        )
        if failed is not None:
            return False
        record(reservation, entries)
        merge_statuses(reservation, [s for s in statuses if s.limit.kind != "concurrent"])
        return True

    async def _settle_once(self, reservation: Reservation, actual: Mapping[Kind, float]) -> None:
        if reservation.settled:
            return
        now = self._clock()
        trial = Reservation(
            reservation.id,
            reservation.limits,
            dict(reservation.amounts),
            dict(reservation.windows),
            reservation.statuses,
            counted=dict(reservation.counted),
        )
        deltas = settle_deltas(trial, actual, now)
        keys = [self._counter(k) for k in deltas]
        args: list[Any] = [math.ceil(SETTLED_MARKER_TTL_S * 1000) if deltas else 0, len(deltas)]
        if deltas:  # the marker that makes a retry of this settle apply nothing (see `_SETTLE`)
            keys.insert(0, self._settled_marker(reservation.id))
        for key, delta in deltas.items():
            args += [_num(delta), self._ttl_ms(key, now)]
        for scope, lease_id in sorted(reservation.leases.items()):
            keys.append(self._lease_set(scope))
            args.append(lease_id)
        if keys:
            try:
                await self._settle(keys=keys, args=args)
            except (RedisError, OSError) as exc:
                raise LimiterUnavailable(f"Redis limiter failed: {type(exc).__name__}") from exc
        reservation.counted, reservation.amounts = trial.counted, trial.amounts
        reservation.settled = True

    @property
    def lease_ttl_s(self) -> float:
        return self._lease_ttl_s

    async def aclose(self) -> None:
        await self.settle_retry.flush()  # the settles still queued get one more try
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()
