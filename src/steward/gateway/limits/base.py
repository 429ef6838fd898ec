"""The limiter contract shared by the memory, Redis and SQL limiters, and the arithmetic they share.

Limits are exact, not approximate: a reservation checks and increments every counter it touches in one
atomic step, so N replicas never admit N× the limit and a denial on one limit leaves the others as they
were. Windows are fixed calendar windows in UTC (the minute, hour, day or calendar month that `now`
falls in) because budgets are billed that way and because fixed windows need one counter each, which
is what makes a single atomic check-and-increment possible in Redis and SQL alike.

Everything that decides (which counter a limit uses, whether an amount fits, how a settle refunds) is
a pure function here, so the three stores differ only in how they read and write counters atomically.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol, get_args

Kind = Literal["requests", "tokens", "spend", "concurrent"]
Window = Literal["minute", "hour", "day", "month"]
Clock = Callable[[], float]
"""Unix seconds. Injectable so tests can stand on a window boundary instead of sleeping to it."""

KINDS: tuple[Kind, ...] = get_args(Kind)
WINDOWS: tuple[Window, ...] = get_args(Window)
_FIXED_WINDOW_S = {"minute": 60, "hour": 3600, "day": 86400}

EPSILON = 1e-9
"""Spend is fractional: 0.1 + 0.2 must still fit a limit of 0.3."""

DEFAULT_LEASE_TTL_S = 300.0
"""How long a concurrency lease lives without `extend`: short enough that a crashed worker's slots
come back within minutes. A live request keeps its lease for as long as it runs by refreshing it
(`extend(r, {})`) every third of this (the gateway does so while a request is in flight)."""

CounterKey = tuple[str, str, str, int]
"""(scope, kind, window, window_start): one row in `limit_counters`, one key in Redis."""


@dataclass(frozen=True)
class Limit:
    """One limit on one scope: e.g. `Limit("key:abc", "tokens", "minute", 10_000)`."""

    scope: str
    kind: Kind
    window: Window | None
    limit: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown limit kind {self.kind!r}")
        if (self.kind == "concurrent") != (self.window is None):
            raise ValueError("a window is required for every kind except 'concurrent', which has none")
        if self.window is not None and self.window not in WINDOWS:
            raise ValueError(f"unknown window {self.window!r}")
        if not (self.limit >= 0 and math.isfinite(self.limit)):
            raise ValueError(f"limit must be a finite number >= 0, not {self.limit!r}")
        if not self.scope:
            raise ValueError("empty scope")


@dataclass
class LimitStatus:
    """Where one limit stands after a reservation (or before a denial)."""

    limit: Limit
    remaining: float
    reset_s: float  # seconds until the window resets; 0 for concurrency limits


class LimiterUnavailable(RuntimeError):
    """The limiter's store failed; the gateway must refuse the request (fail closed), never admit it."""


class LimitExceeded(Exception):
    """Admitting the request would cross `limit`; nothing was counted."""

    def __init__(self, limit: Limit, retry_after: int, statuses: list[LimitStatus], impossible: bool) -> None:
        what = f"per {limit.window}" if limit.window else "concurrent requests"
        super().__init__(f"{limit.kind} limit of {limit.limit:g} {what} for {limit.scope} exceeded")
        self.limit = limit
        self.retry_after = retry_after
        """Whole seconds (>= 1) until the window resets; use it as the `retry-after` header."""
        self.statuses = statuses
        self.impossible = impossible
        """The amount alone is larger than the limit: retrying will never succeed (a 429 still fits)."""


@dataclass
class Reservation:
    """What one request has counted, so `extend` and `settle` can adjust exactly that.

    `counted` is the ledger: every counter the request touched and how much it added there. A stream
    that extends across a window boundary has entries in two windows, and a refund goes back to the
    window the tokens were counted in, so it never frees capacity in a window that never held them.
    """

    id: str
    limits: tuple[Limit, ...]
    amounts: dict[Limit, float]  # per limit: total counted so far (reserve + extends)
    windows: dict[Limit, int]  # per windowed limit: the window start it was last counted in
    statuses: list[LimitStatus]
    counted: dict[CounterKey, float] = field(default_factory=dict)
    leases: dict[str, str] = field(default_factory=dict)  # scope -> lease id
    settled: bool = False


class Limiter(Protocol):
    """Reserve before calling the backend, extend while streaming, settle with the real usage."""

    async def reserve(self, limits: Sequence[Limit], amounts: Mapping[Kind, float]) -> Reservation:
        """Count `amounts` against every limit atomically, or raise `LimitExceeded` and count nothing.

        requests/tokens/spend limits add `amounts[kind]` (0 if absent) to the current window's counter;
        a concurrency limit takes a lease (one slot) that `settle` releases or that expires.
        Raises `LimiterUnavailable` if the store fails.
        """
        ...

    async def extend(self, reservation: Reservation, amounts: Mapping[Kind, float]) -> bool:
        """Count more (a stream reserving its next chunk) and refresh the leases; all-or-nothing.

        False means the extra amount would cross a limit: the gateway stops the stream. `extend(r, {})`
        only refreshes the leases, for long requests that outlive the lease TTL. A lease that already
        expired (a refresh came late) is never simply put back, since another request may hold its
        slot now: it is taken again only if its limit has room, else the lease is lost and the
        answer is False (nothing counted), as for a crossed limit.
        """
        ...

    async def settle(self, reservation: Reservation, actual: Mapping[Kind, float]) -> None:
        """Set each kind in `actual` to the real usage and release the leases; idempotent.

        A store failure raises `LimiterUnavailable`; the store limiters then also keep the settle and
        retry it in the background (and once more in `aclose`).
        """
        ...

    async def aclose(self) -> None: ...


# --- windows -------------------------------------------------------------------------------------


def window_bounds(window: Window, now: float) -> tuple[int, int]:
    """[start, end) of the fixed UTC window containing `now`, in unix seconds."""
    if window == "month":
        dt = datetime.fromtimestamp(now, UTC)
        start = datetime(dt.year, dt.month, 1, tzinfo=UTC)
        end = datetime(dt.year + dt.month // 12, dt.month % 12 + 1, 1, tzinfo=UTC)
        return int(start.timestamp()), int(end.timestamp())
    size = _FIXED_WINDOW_S[window]
    first = int(now // size) * size
    return first, first + size


def window_end(window: Window, start: int) -> int:
    return window_bounds(window, float(start))[1]


def counter_key(limit: Limit, now: float) -> CounterKey:
    assert limit.window is not None
    return (limit.scope, limit.kind, limit.window, window_bounds(limit.window, now)[0])


# --- the decision, shared by every store ---------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One limit in a check: the counter it reads (None for concurrency) and the amount it adds."""

    limit: Limit
    key: CounterKey | None
    amount: float


def plan(limits: Sequence[Limit], amounts: Mapping[Kind, float], now: float) -> list[Entry]:
    entries = []
    for lim in limits:
        if lim.kind == "concurrent":
            entries.append(Entry(lim, None, 1.0))
            continue
        amount = float(amounts.get(lim.kind, 0.0))
        if not (amount >= 0 and math.isfinite(amount)):
            raise ValueError(f"amount for {lim.kind} must be a finite number >= 0, not {amount!r}")
        entries.append(Entry(lim, counter_key(lim, now), amount))
    return entries


def increments(entries: Sequence[Entry]) -> dict[CounterKey, float]:
    """Each counter once, even if two limits share it (same scope, kind and window)."""
    return {e.key: e.amount for e in entries if e.key is not None}


def lease_scopes(entries: Sequence[Entry]) -> list[str]:
    return sorted({e.limit.scope for e in entries if e.key is None})


def new_id() -> str:
    return uuid.uuid4().hex


def decide(
    entries: Sequence[Entry],
    used: Mapping[CounterKey, float],
    leases: Mapping[str, int],
    now: float,
    *,
    check_leases: bool = True,
) -> tuple[Entry | None, list[LimitStatus]]:
    """The first entry that would cross its limit (or None) and every limit's status.

    On admission the statuses include this request's amounts; on denial they show the state untouched.
    `used` and `leases` are the current counter values and live lease counts per scope.
    """
    failed: Entry | None = None
    for e in entries:
        if e.key is None:
            over = check_leases and leases.get(e.limit.scope, 0) + 1 > e.limit.limit + EPSILON
        else:
            over = used.get(e.key, 0.0) + e.amount > e.limit.limit + EPSILON
        if over:
            failed = e
            break
    admitted = failed is None
    statuses = []
    for e in entries:
        if e.key is None:
            n = leases.get(e.limit.scope, 0) + (1 if admitted and check_leases else 0)
            statuses.append(LimitStatus(e.limit, max(0.0, e.limit.limit - n), 0.0))
        else:
            u = used.get(e.key, 0.0) + (e.amount if admitted else 0.0)
            assert e.limit.window is not None
            reset = window_end(e.limit.window, e.key[3]) - now
            statuses.append(LimitStatus(e.limit, max(0.0, e.limit.limit - u), max(0.0, reset)))
    return failed, statuses


def exceeded(failed: Entry, statuses: list[LimitStatus], now: float) -> LimitExceeded:
    if failed.key is None:
        # A slot frees when some request finishes, which nobody can predict; ask for a quick retry.
        return LimitExceeded(failed.limit, 1, statuses, impossible=failed.limit.limit < 1)
    assert failed.limit.window is not None
    reset = window_end(failed.limit.window, failed.key[3]) - now
    return LimitExceeded(
        failed.limit,
        max(1, math.ceil(reset)),
        statuses,
        impossible=failed.amount > failed.limit.limit + EPSILON,
    )


def new_reservation(entries: Sequence[Entry], statuses: list[LimitStatus]) -> Reservation:
    res = Reservation(
        id=new_id(),
        limits=tuple(e.limit for e in entries),
        amounts={},
        windows={},
        statuses=statuses,
        leases={scope: new_id() for scope in lease_scopes(entries)},
    )
    record(res, entries)
    return res


def record(res: Reservation, entries: Sequence[Entry]) -> None:
    """Add admitted entries to the reservation's ledger."""
    for key, amount in increments(entries).items():
        res.counted[key] = res.counted.get(key, 0.0) + amount
    for e in entries:
        if e.key is not None:
            res.amounts[e.limit] = res.amounts.get(e.limit, 0.0) + e.amount
            res.windows[e.limit] = e.key[3]


def extension_entries(res: Reservation, amounts: Mapping[Kind, float], now: float) -> list[Entry]:
    """`extend` checks the windowed limits it adds to only: the leases are already held, and a kind
    it adds nothing to is not checked, so `extend(r, {})` (a lease refresh for a long request)
    succeeds even when settled overruns have left a counter above its limit (it fails only when a
    lease expired and its slot was taken meanwhile)."""
    kept = [lim for lim in res.limits if lim.kind != "concurrent" and float(amounts.get(lim.kind, 0.0)) != 0]
    return plan(kept, amounts, now)


def merge_statuses(res: Reservation, statuses: Sequence[LimitStatus]) -> None:
    """After an extend, the windowed statuses are fresher than the ones `reserve` returned."""
    fresh = {s.limit: s for s in statuses}
    res.statuses = [fresh.get(s.limit, s) for s in res.statuses]


def settle_deltas(res: Reservation, actual: Mapping[Kind, float], now: float) -> dict[CounterKey, float]:
    """Per counter, what to add so each settled kind's total equals `actual[kind]`.

    Unused amounts are refunded newest-first into the windows they were counted in, never below what
    this reservation put there; usage beyond the reservation is added to the current window unchecked
    (it already happened). The ledger and `amounts` are updated to the settled figures.
    """
    deltas: dict[CounterKey, float] = {}
    series = {
        (lim.scope, lim.kind, lim.window): lim
        for lim in res.limits
        if lim.kind in actual and lim.kind != "concurrent"
    }
    for (scope, kind, window), lim in series.items():
        target = float(actual[kind])
        if not (target >= 0 and math.isfinite(target)):
            raise ValueError(f"actual {kind} must be a finite number >= 0, not {target!r}")
        mine = sorted(
            ((k, v) for k, v in res.counted.items() if k[:3] == (scope, kind, window)),
            key=lambda kv: kv[0][3],
            reverse=True,
        )
        delta = target - sum(v for _, v in mine)
        if delta < 0:
            for k, v in mine:
                take = min(v, -delta)
                if take > 0:
                    deltas[k] = deltas.get(k, 0.0) - take
                    res.counted[k] = v - take
                    delta += take
        elif delta > 0:
            k = counter_key(lim, now)
            deltas[k] = deltas.get(k, 0.0) + delta
            res.counted[k] = res.counted.get(k, 0.0) + delta
        for other in res.limits:
            if (other.scope, other.kind, other.window) == (scope, kind, window):
                res.amounts[other] = target
    return {k: d for k, d in deltas.items() if d != 0}


# --- headers -------------------------------------------------------------------------------------


def format_reset(seconds: float) -> str:
    """OpenAI's style (Go durations): "17ms", "1s", "6m0s", "1h2m5s"; whole seconds from 1 s up."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds - 1e-9)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.6f}".rstrip("0").rstrip(".")


def ratelimit_headers(statuses: Iterable[LimitStatus]) -> dict[str, str]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` from the limit that binds first.

    For each kind the status with the least remaining wins (ties: the one that resets soonest), across
    key and tenant scopes and every window, because that is the one a client will hit. Remaining is
    floored to a whole number; reset uses `format_reset`. Kinds without a windowed limit get no headers.
    """
    out: dict[str, str] = {}
    statuses = list(statuses)
    for kind in ("requests", "tokens"):
        cands = [s for s in statuses if s.limit.kind == kind and s.limit.window is not None]
        if not cands:
            continue
        tight = min(cands, key=lambda s: (s.remaining, s.reset_s))
        out[f"x-ratelimit-limit-{kind}"] = _count(tight.limit.limit)
        out[f"x-ratelimit-remaining-{kind}"] = str(math.floor(tight.remaining + EPSILON))
        out[f"x-ratelimit-reset-{kind}"] = format_reset(tight.reset_s)
    return out
