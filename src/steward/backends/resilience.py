"""Resilience around upstreams: a circuit breaker and a fallback chain of backends.

Why a breaker: when an upstream is down, every request would otherwise spend its connect timeout
and retries on it before failing (or falling back), multiplying latency and load on a sick server.
After `failure_threshold` consecutive failed upstream attempts the breaker opens and calls fail
fast (`CircuitOpenError`, retryable, so a `FallbackChain` moves on at once); after `cooldown_s` it
lets exactly one probe through (half-open): success closes it, failure re-opens it for another
cool-down.

What counts as a failure: the upstream misbehaving — a 5xx, a connect error, a timeout, a malformed
body, a dropped stream. Not a 4xx (the upstream is healthy; the request was bad) and not a 429 (the
upstream is healthy and says "slower"; retries honour its `retry-after` instead). Failures are
counted per HTTP attempt, so `failure_threshold` means "K upstream requests in a row failed",
whatever the retry settings.

Why a fallback chain: a routing-table entry may name several backends for one model (a primary vLLM,
a secondary one, the built-in model as last resort). The chain tries them in order while the error
is retryable (upstream down, overloaded, timed out, circuit open); a non-retryable error (the
request itself is wrong) is raised at once since no other backend would accept it either. A stream
falls back only before its first chunk reached the caller — after that, a switch would splice two
different answers together.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

from steward.backends.base import JSON, Backend, BackendError, Call, ModelInfo

BreakerState = Literal["closed", "open", "half_open"]


class CircuitOpenError(BackendError):
    """Raised instead of calling an upstream whose circuit is open; retryable, answers 503."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(
            f"upstream {name!r} is unavailable (circuit open); retry later",
            status=503,
            type="upstream_error",
            code="upstream_unavailable",
            retryable=True,
            retry_after=max(0.0, retry_after),
        )


class CircuitBreaker:
    """closed → open after `failure_threshold` consecutive failures → half-open after `cooldown_s`.

    Usage per upstream attempt: `before_call()` (raises `CircuitOpenError` when calls must not go
    out), then exactly one of `on_success()`, `on_failure()` or `on_abandon()` (the attempt ended
    without telling anything about the upstream, e.g. the caller went away: a half-open probe slot
    is released so the next call can probe). `clock` is injectable so tests need not sleep.
    Single-threaded by design (one asyncio loop); no locks needed.
    """

    def __init__(
        self,
        name: str = "upstream",
        *,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        """The current state, turning open into half-open once the cool-down has passed."""
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = "half_open"
            self._probe_in_flight = False
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after(self) -> float:
        """Seconds until the breaker will let a probe through (0 when it would now)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self._clock())

    def before_call(self) -> None:
        state = self.state
        if state == "closed":
            return
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return
        # Open, or half-open with its single probe already out: fail fast.
        raise CircuitOpenError(self.name, self.retry_after() if state == "open" else self.cooldown_s)

    def on_success(self) -> None:
        self._state = "closed"
        self._failures = 0
        self._probe_in_flight = False

    def on_failure(self) -> None:
        self._failures += 1
        if self._state == "half_open" or self._failures >= self.failure_threshold:
            self._state = "open"
            self._opened_at = self._clock()
        self._probe_in_flight = False

    def on_abandon(self) -> None:
        self._probe_in_flight = False


def _member_model(member: Backend, model_id: str) -> str:
    """The member's own name for `model_id` (members without a mapping use the name as is)."""
    resolve = getattr(member, "upstream_model", None)
    return str(resolve(model_id)) if callable(resolve) else model_id


class FallbackChain:
    """A `Backend` that tries its members in order on retryable errors (and open circuits).

    Model names: inside a chain, `call.upstream_model` is the client-facing model id (the chain's
    `upstream_model()` is the identity); for each member the chain rewrites it — and `body["model"]` —
    with that member's `upstream_model(model_id)` when it has one, so two upstreams may call the same
    model differently. `call.metadata["served_by"]` records which member answered, and
    `call.metadata["fallbacks"]` how many members failed before it.

    `models()` is the union of the members' models (first member wins on duplicates);
    `count_prompt_tokens` takes the maximum over members, so a reservation holds whichever answers.
    """

    def __init__(self, name: str, members: Sequence[Backend]) -> None:
        if not members:
            raise ValueError("a fallback chain needs at least one backend")
        self.name = name
        self.members = list(members)

    async def start(self) -> None:
        for m in self.members:
            await m.start()

    async def aclose(self) -> None:
        for m in self.members:
            await m.aclose()

    def models(self) -> list[ModelInfo]:
        seen: dict[str, ModelInfo] = {}
        for m in self.members:
            for info in m.models():
                seen.setdefault(info.id, info)
        return list(seen.values())

    def upstream_model(self, model_id: str) -> str:
        return model_id

    def _member_call(self, member: Backend, call: Call) -> Call:
        name = _member_model(member, call.upstream_model)
        body = call.body if call.body.get("model") == name else {**call.body, "model": name}
        return replace(call, body=body, upstream_model=name)

    def count_prompt_tokens(self, route: Literal["chat", "completions"], call: Call) -> int:
        return max(m.count_prompt_tokens(route, self._member_call(m, call)) for m in self.members)

    async def _first(self, call: Call, method: str) -> JSON:
        last: BackendError | None = None
        for i, member in enumerate(self.members):
            try:
                result: JSON = await getattr(member, method)(self._member_call(member, call))
            except BackendError as e:
                if not e.retryable:
                    raise
                last = e
                continue
            call.metadata["served_by"] = member.name
            call.metadata["fallbacks"] = i
            return result
        assert last is not None
        raise last

    async def _first_stream(self, call: Call, method: str) -> AsyncIterator[JSON]:
        last: BackendError | None = None
        for i, member in enumerate(self.members):
            stream: AsyncIterator[JSON] = getattr(member, method)(self._member_call(member, call))
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                first = None
            except BackendError as e:
                await _aclose(stream)
                if not e.retryable:
                    raise
                last = e
                continue
            call.metadata["served_by"] = member.name
            call.metadata["fallbacks"] = i
            try:
                if first is not None:
                    yield first
                    async for chunk in stream:
                        yield chunk
            finally:
                await _aclose(stream)
            return
        assert last is not None
        raise last

    async def chat(self, call: Call) -> JSON:
        return await self._first(call, "chat")

    async def completion(self, call: Call) -> JSON:
        return await self._first(call, "completion")

    async def embeddings(self, call: Call) -> JSON:
        return await self._first(call, "embeddings")

    def chat_stream(self, call: Call) -> AsyncIterator[JSON]:
        return self._first_stream(call, "chat_stream")

    def completion_stream(self, call: Call) -> AsyncIterator[JSON]:
        return self._first_stream(call, "completion_stream")


async def _aclose(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
