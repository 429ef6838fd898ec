"""Circuit breaker and fallback chain: unit tests with an injected clock, then over real HTTP.

The breaker's clock is injected (a `FakeClock` moved by hand), so cool-downs take no wall time.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Literal

import pytest

from steward.backends.base import Backend, BackendError, Call, ModelInfo
from steward.backends.fake_upstream import FakeUpstream, Fault
from steward.backends.openai import OpenAIBackend, build_openai_backend
from steward.backends.resilience import CircuitBreaker, CircuitOpenError, FallbackChain


def run(coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def no_sleep(delay: float) -> None:
    return None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream(url: str, name: str, clock: FakeClock | None = None, **cfg: Any) -> OpenAIBackend:
    settings: dict[str, Any] = {"name": name, "base_url": url, "models": {"m": "fake-model"}, **cfg}
    return OpenAIBackend.from_config(
        settings, sleep=no_sleep, rng=random.Random(0), clock=clock or FakeClock()
    )


def chat_call(**body: Any) -> Call:
    return Call({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, "m", "req")


async def collect(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c async for c in stream]


# ---- CircuitBreaker ------------------------------------------------------------------------------


def test_breaker_opens_after_k_consecutive_failures() -> None:
    clock = FakeClock()
    b = CircuitBreaker("u", failure_threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        b.before_call()
        b.on_failure()
    b.before_call()
    b.on_success()  # a success resets the count: failures must be consecutive
    assert b.consecutive_failures == 0
    for _ in range(3):
        assert b.state == "closed"
        b.before_call()
        b.on_failure()
    assert b.state == "open"
    clock.t += 4
    with pytest.raises(CircuitOpenError) as ei:
        b.before_call()
    assert ei.value.status == 503 and ei.value.retryable and ei.value.retry_after == pytest.approx(6)


def test_breaker_half_opens_with_one_probe_after_cooldown() -> None:
    clock = FakeClock()
    b = CircuitBreaker("u", failure_threshold=1, cooldown_s=10, clock=clock)
    b.before_call()
    b.on_failure()
    assert b.state == "open"
    clock.t += 10
    assert b.state == "half_open"
    b.before_call()  # the probe
    with pytest.raises(CircuitOpenError):
        b.before_call()  # only one probe at a time
    b.on_failure()  # probe failed: open again, for a fresh cool-down
    assert b.state == "open" and b.retry_after() == pytest.approx(10)
    clock.t += 10
    b.before_call()
    b.on_abandon()  # caller went away: the probe slot is free again
    b.before_call()
    b.on_success()
    assert b.state == "closed"
    b.before_call()
    b.before_call()  # closed: no limit


def test_breaker_rejects_bad_threshold() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)


# ---- breaker inside the openai backend --------------------------------------------------------------


def test_backend_circuit_opens_then_probes_after_cooldown() -> None:
    async def main() -> None:
        clock = FakeClock()
        async with FakeUpstream() as up:
            backend = upstream(up.url, "a", clock, max_retries=0, breaker_failures=3, breaker_cooldown_s=30)
            up.fail(500, times=3)
            for _ in range(3):
                with pytest.raises(BackendError) as ei:
                    await backend.chat(chat_call())
                assert ei.value.status == 502
            assert backend.breaker.state == "open" and up.attempts() == 3
            with pytest.raises(CircuitOpenError) as ei2:  # fails fast, no request goes out
                await backend.chat(chat_call())
            with pytest.raises(CircuitOpenError):
                await collect(backend.chat_stream(chat_call(stream=True)))
            assert up.attempts() == 3 and ei2.value.retry_after == pytest.approx(30)
            clock.t += 30
            out = await backend.chat(chat_call())  # the half-open probe succeeds
            assert out["choices"] and backend.breaker.state == "closed" and up.attempts() == 4
            await backend.aclose()

    run(main())


def test_breaker_counts_attempts_not_calls_and_ignores_4xx_and_429() -> None:
    async def main() -> None:
        async with FakeUpstream() as up:
            backend = upstream(up.url, "a", max_retries=2, breaker_failures=3)
            up.fail(400, times=5)
            for _ in range(5):
                with pytest.raises(BackendError):
                    await backend.chat(chat_call())
            up.fail(429, times=3, retry_after=0)
            with pytest.raises(BackendError):
                await backend.chat(chat_call())
            assert backend.breaker.state == "closed"
            up.fail(503, times=3)  # one call, three failed attempts: open
            with pytest.raises(BackendError):
                await backend.chat(chat_call())
            assert backend.breaker.state == "open"
            await backend.aclose()

    run(main())


def test_probe_slot_is_released_when_a_stream_is_abandoned() -> None:
    async def main() -> None:
        clock = FakeClock()
        async with FakeUpstream() as up:
            backend = upstream(up.url, "a", clock, max_retries=0, breaker_failures=1, breaker_cooldown_s=5)
            up.fail(500)
            with pytest.raises(BackendError):
                await backend.chat(chat_call())
            clock.t += 5
            stream = backend.chat_stream(chat_call(stream=True))
            await stream.__anext__()  # the probe is in flight...
            await stream.aclose()  # type: ignore[attr-defined]  # ...and abandoned by the caller
            assert backend.breaker.state == "half_open"
            assert (await backend.chat(chat_call()))["choices"]
            assert backend.breaker.state == "closed"
            await backend.aclose()

    run(main())


# ---- FallbackChain ---------------------------------------------------------------------------------


def test_fallback_to_second_upstream_when_first_is_down() -> None:
    async def main() -> None:
        async with FakeUpstream() as up:
            down = upstream(f"http://127.0.0.1:{closed_port()}/v1", "down", max_retries=1)
            alive = OpenAIBackend.from_config(
                {"name": "alive", "base_url": up.url, "models": {"m": "served-as-other"}}, sleep=no_sleep
            )
            chain = FallbackChain("m-chain", [down, alive])
            assert isinstance(chain, Backend)
            await chain.start()
            assert [m.id for m in chain.models()] == ["m"]
            call = chat_call()
            out = await chain.chat(call)
            assert (
                out["choices"] and call.metadata["served_by"] == "alive" and call.metadata["fallbacks"] == 1
            )
            body = up.seen[-1].body
            assert body is not None and body["model"] == "served-as-other"  # the member's own name
            assert call.body["model"] == "m"  # the caller's call is not mutated

            stream_call = chat_call(stream=True)
            chunks = await collect(chain.chat_stream(stream_call))
            assert "usage" in chunks[-1] and stream_call.metadata["served_by"] == "alive"
            await chain.aclose()

    run(main())


def test_fallback_skips_an_open_circuit_without_calling_it() -> None:
    async def main() -> None:
        async with FakeUpstream() as first, FakeUpstream() as second:
            a = upstream(first.url, "a", max_retries=0, breaker_failures=1)
            b = upstream(second.url, "b")
            chain = FallbackChain("c", [a, b])
            first.fail(500, times=1)
            assert (await chain.chat(chat_call()))["choices"]  # a fails (circuit opens), b answers
            assert first.attempts() == 1 and second.attempts() == 1
            assert (await chain.chat(chat_call()))["choices"]
            assert first.attempts() == 1 and second.attempts() == 2  # a was never asked again
            await chain.aclose()

    run(main())


def test_no_fallback_on_a_client_error() -> None:
    async def main() -> None:
        async with FakeUpstream() as first, FakeUpstream() as second:
            chain = FallbackChain("c", [upstream(first.url, "a"), upstream(second.url, "b")])
            first.fail(400)
            with pytest.raises(BackendError) as ei:
                await chain.chat(chat_call())
            assert ei.value.status == 400 and second.attempts() == 0
            first.fail(400)
            with pytest.raises(BackendError):
                await collect(chain.chat_stream(chat_call(stream=True)))
            assert second.attempts() == 0
            await chain.aclose()

    run(main())


def test_all_members_failing_raises_the_last_error() -> None:
    async def main() -> None:
        async with FakeUpstream() as first, FakeUpstream() as second:
            chain = FallbackChain(
                "c", [upstream(first.url, "a", max_retries=0), upstream(second.url, "b", max_retries=0)]
            )
            first.fail(500)
            second.fail(429, retry_after=7)
            with pytest.raises(BackendError) as ei:
                await chain.chat(chat_call())
            assert ei.value.status == 503 and ei.value.retry_after == 7
            await chain.aclose()

    run(main())


def test_stream_falls_back_before_the_first_chunk_but_not_after() -> None:
    async def main() -> None:
        async with FakeUpstream() as first, FakeUpstream() as second:
            chain = FallbackChain("c", [upstream(first.url, "a", max_retries=0), upstream(second.url, "b")])
            first.fail(502)
            call = chat_call(stream=True)
            chunks = await collect(chain.chat_stream(call))
            assert call.metadata["served_by"] == "b" and "usage" in chunks[-1]

            first.add(Fault("drop", after_chunks=2))
            got: list[dict[str, Any]] = []
            with pytest.raises(BackendError) as ei:
                async for c in chain.chat_stream(chat_call(stream=True)):
                    got.append(c)
            assert len(got) == 2 and not ei.value.retryable
            assert second.attempts() == 1  # no second answer spliced onto the first
            await chain.aclose()

    run(main())


class Scripted:
    """A minimal non-HTTP backend (like `builtin` as the last resort) to check chain plumbing."""

    name = "local"

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="m", backend="builtin")]

    def count_prompt_tokens(self, route: Literal["chat", "completions"], call: Call) -> int:
        return 1

    async def chat(self, call: Call) -> dict[str, Any]:
        self.calls.append(call)
        return {"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1}}

    async def _gen(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(call)
        yield {"choices": [], "usage": {"prompt_tokens": 1}}

    def chat_stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        return self._gen(call)

    async def completion(self, call: Call) -> dict[str, Any]:
        return await self.chat(call)

    def completion_stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        return self._gen(call)

    async def embeddings(self, call: Call) -> dict[str, Any]:
        return await self.chat(call)


def test_chain_with_a_non_http_last_resort() -> None:
    async def main() -> None:
        down = upstream(f"http://127.0.0.1:{closed_port()}/v1", "down", max_retries=0)
        local = Scripted()
        chain = FallbackChain("c", [down, local])
        call = chat_call()
        assert chain.count_prompt_tokens("chat", call) >= down.count_prompt_tokens("chat", call)
        await chain.chat(call)
        assert call.metadata["served_by"] == "local" and local.calls[0].upstream_model == "m"
        await collect(chain.chat_stream(chat_call(stream=True)))
        await chain.aclose()

    run(main())


def test_chain_needs_members() -> None:
    with pytest.raises(ValueError):
        FallbackChain("c", [])


def test_build_from_routing_entries() -> None:
    one = build_openai_backend("m", {"name": "a", "base_url": "http://127.0.0.1:1/v1", "models": {"m": "x"}})
    assert isinstance(one, OpenAIBackend) and one.upstream_model("m") == "x"
    chain = build_openai_backend(
        "m",
        [
            {"name": "a", "base_url": "http://127.0.0.1:1/v1", "models": {"m": "x"}},
            {"name": "b", "base_url": "http://127.0.0.1:2", "models": {"m": "y"}},
        ],
    )
    assert isinstance(chain, FallbackChain) and [b.name for b in chain.members] == ["a", "b"]
    assert chain.upstream_model("m") == "m"
    with pytest.raises(ValueError):
        build_openai_backend("m", [{"name": "a"}])
