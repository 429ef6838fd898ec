"""The built-in backend's batching worker: seeded determinism whatever the batch, no head-of-line
blocking, fault isolation between requests that share a batch, and a shutdown that answers every
request.

Each test starts its own backend (the model loads in well under a second), so the weights' packing
state and the queue start fresh and no test depends on what another decoded before it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from typing import Any

import pytest

import steward.model.generate as G
from steward.backends.base import BackendError, Call
from steward.backends.builtin import BuiltinBackend

PROMPT = "Once upon a time"
# Prompts of other lengths to batch beside the seeded one: left padding, other budgets.
OTHERS = ["The sea", "In 1990 the city council of the town", "Hello", "A list of the best known rivers"]


def call(body: dict[str, Any]) -> Call:
    return Call(body={"model": "builtin", **body}, upstream_model="builtin", request_id="t")


async def started(**kw: Any) -> BuiltinBackend:
    b = BuiltinBackend(threads=1, **kw)
    await b.start()
    return b


async def completion(b: BuiltinBackend, body: dict[str, Any], stream: bool = False) -> list[Any]:
    """Text and logprobs of every choice, in index order, streamed or not."""
    if not stream:
        r = await b.completion(call(body))
        return [(c["text"], c["logprobs"]["token_logprobs"]) for c in r["choices"]]
    texts: dict[int, str] = {}
    lps: dict[int, list[float]] = {}
    async for ch in b.completion_stream(call({**body, "stream": True})):
        for c in ch["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            lps.setdefault(c["index"], []).extend(c["logprobs"]["token_logprobs"])
    return [(texts[i], lps[i]) for i in sorted(texts)]


def seeded(seed: int, n: int = 1, max_tokens: int = 32) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "n": n,
    }


# --- finding 1: a seeded request is deterministic whatever else runs ------------------------------


def test_seeded_request_is_identical_alone_batched_streamed_and_as_choice_0() -> None:
    """Exact text and logprobs: alone (first thing the backend decodes, before any batch of several
    rows), beside 3 unseeded or 4 seeded requests of other lengths in the same sampling group (not
    streamed, streamed), and as choice 0 of n=4. The seeds are ones whose tokens flipped in a
    shared batch before the fix; the logprobs differed in the last digits in nearly every shared
    batch."""

    async def go() -> None:
        b = await started(batch_wait_ms=30.0, max_batch=8)
        try:
            for seed in (40, 44):
                alone = await completion(b, seeded(seed))
                for stream, k, other_seed in ((False, 3, None), (True, 4, 7)):
                    others = [
                        completion(
                            b,
                            {
                                "prompt": p,
                                "temperature": 1.0,
                                "max_tokens": 10 + 5 * i,
                                "logprobs": 1,
                                **({"seed": other_seed + i} if other_seed is not None else {}),
                            },
                        )
                        for i, p in enumerate(OTHERS[:k])
                    ]
                    got, *_ = await asyncio.gather(completion(b, seeded(seed), stream), *others)
                    assert got == alone, (seed, stream, k)
                four = await completion(b, seeded(seed, n=4))
                assert [four[0]] == alone, seed
                assert len({t for t, _ in four}) > 1  # the other choices have seeds of their own
                again = await completion(b, seeded(seed, n=4), stream=True)
                assert again == four
        finally:
            await b.aclose()

    asyncio.run(go())


def test_finished_request_is_answered_before_its_batch_ends() -> None:
    """Unseeded requests still share a batch, and a short one is answered when its own row ends,
    not when the batch's longest row does."""

    async def go() -> tuple[float, float, int]:
        b = await started(batch_wait_ms=30.0)
        t0 = time.perf_counter()

        async def timed(body: dict[str, Any]) -> float:
            await b.completion(call({"temperature": 0, **body}))
            return time.perf_counter() - t0

        try:
            long, short = await asyncio.gather(
                timed({"prompt": "The history of the city", "max_tokens": 200}),
                timed({"prompt": "Hello", "max_tokens": 3}),
            )
            return long, short, b.batches
        finally:
            await b.aclose()

    long, short, batches = asyncio.run(go())
    assert batches == 1
    assert short < long / 3, (short, long)


def test_request_arriving_during_a_long_batch_does_not_wait_for_it() -> None:
    """Head-of-line blocking: a 3-token request that arrives while a 230-token one decodes (in its
    own sampling group or not) starts at the next step instead of after the long one."""

    async def go() -> list[tuple[float, float]]:
        b = await started(batch_wait_ms=2.0)

        async def timed(body: dict[str, Any]) -> float:
            t = time.perf_counter()
            await b.completion(call(body))
            return time.perf_counter() - t

        out = []
        try:
            for temp in (0, 0.8):  # the same group as the long one, then another
                long = asyncio.create_task(
                    timed({"prompt": "The history of the city", "temperature": 0, "max_tokens": 230})
                )
                await asyncio.sleep(0.1)
                short = await timed({"prompt": "The sea", "temperature": temp, "max_tokens": 3})
                out.append((short, await long))
        finally:
            await b.aclose()
        return out

    for short, long in asyncio.run(go()):
        assert short < long / 4, (short, long)


# --- finding 3: a fault in one request fails that request only -------------------------------------


POISON = "poison " * 9


def _results(res: list[Any]) -> list[str]:
    return ["error" if isinstance(r, BaseException) else "ok" for r in res]


def test_row_fault_fails_only_its_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row whose bookkeeping raises ends only its own request, with a 500."""
    poison_len: list[int] = []
    orig_add = G._Row.add

    def add(self: G._Row, token: int, lp: G.TokenLogprob | None) -> None:
        if self.prompt_tokens in poison_len and self.sampled == 0:
            raise RuntimeError("injected fault in one row")
        orig_add(self, token, lp)

    monkeypatch.setattr(G._Row, "add", add)

    async def go() -> list[Any]:
        b = await started(batch_wait_ms=30.0, max_batch=8)
        assert b.tokenizer is not None
        poison_len.append(len(b.tokenizer.encode_text(POISON)))
        body = {"temperature": 0.7, "max_tokens": 20}
        try:
            res = await asyncio.gather(
                completion(b, {**body, "prompt": "The sea", "logprobs": 0}, stream=True),
                completion(b, {**body, "prompt": POISON, "logprobs": 0}),
                completion(b, {**body, "prompt": "Once upon a time", "logprobs": 0}),
                completion(b, {**body, "prompt": "In 1990 the", "logprobs": 0, "n": 2}, stream=True),
                return_exceptions=True,
            )
            assert b.batches == 1  # they did share a batch
            return res
        finally:
            await b.aclose()

    res = asyncio.run(go())
    assert _results(res) == ["ok", "error", "ok", "ok"]
    assert isinstance(res[1], BackendError) and res[1].status == 500


def _failing_run_rows(
    monkeypatch: pytest.MonkeyPatch, poison: Callable[[list[list[int]]], bool], at_step: int
) -> None:
    """Make every forward pass over a batch that holds a poisoned prompt fail at `at_step`."""
    orig = G.run_rows

    def run_rows(*args: Any, **kw: Any) -> Generator[list[G.Row], None, None]:
        prompts = args[2]
        alone = (
            len({tuple(p) for p in prompts}) == 1
        )  # one request's rows (every test request has one prompt)
        for step, live in enumerate(orig(*args, **kw)):
            # Alone, the poisoned request fails at once: it cannot finish before `at_step` instead.
            if (step == at_step or alone) and poison(prompts):
                raise RuntimeError("injected forward failure")
            yield live

    monkeypatch.setattr(G, "run_rows", run_rows)


def test_batch_failure_is_retried_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward pass that fails takes the batch down; each request is then retried alone once, so
    only the one that fails alone gets the 500. A stream that already sent tokens cannot be
    restarted and ends with the error."""
    poison_ids: list[int] = []
    _failing_run_rows(monkeypatch, lambda ps: any(p == poison_ids for p in ps), at_step=4)

    async def go() -> list[Any]:
        b = await started(batch_wait_ms=30.0, max_batch=8)
        assert b.tokenizer is not None
        poison_ids.extend(b.tokenizer.encode_text(POISON))
        # Greedy: the stream's tokens are the same every run (it has sent some by step 4).
        body = {"temperature": 0, "max_tokens": 20, "logprobs": 0}
        try:
            return await asyncio.gather(
                completion(b, {**body, "prompt": "The sea"}),
                completion(b, {**body, "prompt": POISON}),
                completion(b, {**body, "prompt": "Once upon a time", "n": 3}),
                completion(b, {**body, "prompt": "In 1990 the"}, stream=True),
                return_exceptions=True,
            )
        finally:
            await b.aclose()

    res = asyncio.run(go())
    # The stream had sent tokens before the failure: it cannot be restarted.
    assert _results(res) == ["ok", "error", "ok", "error"]
    assert all(isinstance(r, BackendError) and r.status == 500 for r in (res[1], res[3]))
    assert [len(t) for t, _ in res[2]] and len(res[2]) == 3


# --- finding 5: shutdown answers everything -----------------------------------------------------------


def test_shutdown_answers_every_request() -> None:
    """What is decoding when `aclose()` starts finishes; whatever is queued, or arrives while the
    worker winds down, gets a 503 at once instead of waiting forever."""

    async def go() -> list[Any]:
        # max_batch=1: the first request's 4 rows fill the worker (4 batches of 1 row), so the
        # next ones stay queued; 4 x 60 tokens are still decoding when aclose() starts.
        b = await started(batch_wait_ms=2.0, max_batch=1)
        body = {"prompt": "The history of the city", "seed": 1, "max_tokens": 60}

        async def req(temp: float, n: int = 1) -> Any:
            return await asyncio.wait_for(b.completion(call({**body, "temperature": temp, "n": n})), 10)

        first = asyncio.create_task(req(0.7, n=4))
        await asyncio.sleep(0.02)
        queued = [asyncio.create_task(req(t)) for t in (0.5, 0.9)]
        await asyncio.sleep(0.01)
        close = asyncio.create_task(b.aclose())
        await asyncio.sleep(0)  # aclose has begun; the worker is still decoding the first
        late = asyncio.create_task(req(0))
        res = await asyncio.gather(first, *queued, late, return_exceptions=True)
        await close
        return res

    res = asyncio.run(go())
    assert len(res[0]["choices"]) == 4, res[0]
    for r in res[1:]:
        assert isinstance(r, BackendError) and r.status == 503, r
