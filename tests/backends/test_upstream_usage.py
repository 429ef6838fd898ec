"""The `openai` backend checks the upstream's `usage` before the gateway settles limits by it.

Whatever the upstream sends (no usage, `{}`, nulls, strings, booleans, NaN, negative or absurd
counts, or counts far below the text it actually sent), the backend hands the gateway usage whose
`prompt_tokens`/`completion_tokens`/`total_tokens` are non-negative ints, replaced by the gateway's
own estimate where the upstream's cannot be trusted, and marked `estimated` (in the usage object
and in `call.metadata["usage_estimated"]`). A scripted aiohttp upstream on loopback answers each
test with exactly the body it is given.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from aiohttp import web

from steward.backends.base import Call
from steward.backends.openai import OpenAIBackend

TEXT = "word " * 100  # 500 bytes of answer: ~100 tokens, and at least 16 by any tokenizer
HONEST = {"prompt_tokens": 20, "completion_tokens": 100, "total_tokens": 120}


def run(coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Scripted:
    """An upstream answering every POST with `self.reply` (a JSON object, or raw SSE bytes)."""

    def __init__(self) -> None:
        self.reply: Any = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        if isinstance(self.reply, bytes):
            return web.Response(body=self.reply, content_type="text/event-stream")
        return web.Response(body=json.dumps(self.reply).encode(), content_type="application/json")

    async def __aenter__(self) -> Scripted:
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def make(url: str) -> OpenAIBackend:
    return OpenAIBackend.from_config(
        {"name": "up", "base_url": url, "models": {"m": "up-model"}, "max_retries": 0},
        rng=random.Random(0),
    )


def chat_call(content: str = "hello there", **body: Any) -> Call:
    return Call(
        body={"model": "m", "messages": [{"role": "user", "content": content}], **body},
        upstream_model="up-model",
        request_id="req-u",
    )


def completion(text: str = TEXT, usage: Any = None, *, with_usage: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if with_usage:
        out["usage"] = usage
    return out


def sse(*events: Any) -> bytes:
    out = b""
    for e in events:
        out += b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
    return out + b"data: [DONE]\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def stream_of(text: str, usage: Any, *, pieces: int = 10) -> bytes:
    step = math.ceil(len(text) / pieces)
    parts = [text[i : i + step] for i in range(0, len(text), step)]
    return sse(
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": p}) for p in parts),
        chunk({}, "stop"),
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "up-model",
            "choices": [],
            "usage": usage,
        },
    )


async def collect(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c async for c in stream]


def assert_sane(usage: dict[str, Any]) -> None:
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert type(usage[k]) is int and usage[k] >= 0, (k, usage)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


BAD_USAGES = [
    pytest.param(None, id="null"),
    pytest.param({}, id="empty"),
    pytest.param({"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}, id="null-counts"),
    pytest.param({"prompt_tokens": "5", "completion_tokens": "x", "total_tokens": "5x"}, id="strings"),
    pytest.param({"prompt_tokens": True, "completion_tokens": False, "total_tokens": 1}, id="booleans"),
    pytest.param({"prompt_tokens": -50, "completion_tokens": 10, "total_tokens": -40}, id="negative"),
    pytest.param(
        {"prompt_tokens": 20, "completion_tokens": -100, "total_tokens": -80}, id="negative-completion"
    ),
    pytest.param({"prompt_tokens": 2.5, "completion_tokens": 100.5, "total_tokens": 103}, id="fractions"),
    pytest.param({"prompt_tokens": 1e300, "completion_tokens": 10**30, "total_tokens": 0}, id="absurd"),
    pytest.param([1, 2], id="a-list"),
    pytest.param("lots", id="a-string"),
    pytest.param({"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}, id="implausibly-low"),
    pytest.param({"prompt_tokens": 20, "completion_tokens": 0, "total_tokens": 20}, id="zero-completion"),
]


@pytest.mark.parametrize("usage", BAD_USAGES)
def test_bad_usage_of_a_chat_answer_is_replaced_by_the_estimate(usage: Any) -> None:
    async def main() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            up.reply = completion(usage=usage)
            call = chat_call()
            out = await backend.chat(call)
            await backend.aclose()
            u = out["usage"]
            assert_sane(u)
            assert u["estimated"] is True and call.metadata["usage_estimated"] is True
            # never below what the client visibly got: 500 bytes at ≤ 4 bytes a token
            assert u["completion_tokens"] >= 125
            assert u["prompt_tokens"] >= 1
            assert out["choices"][0]["message"]["content"] == TEXT

    run(main())


@pytest.mark.parametrize("usage", BAD_USAGES)
def test_bad_usage_of_a_stream_is_replaced_by_the_estimate(usage: Any) -> None:
    async def main() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            up.reply = stream_of(TEXT, usage)
            call = chat_call(stream=True)
            chunks = await collect(backend.chat_stream(call))
            await backend.aclose()
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert text == TEXT
            u = chunks[-1]["usage"]
            assert chunks[-1]["choices"] == []
            assert_sane(u)
            assert u["estimated"] is True and call.metadata["usage_estimated"] is True
            assert u["completion_tokens"] >= 125
            # no chunk before the last hands the gateway usage it cannot use
            for c in chunks[:-1]:
                assert c.get("usage") is None or isinstance(c["usage"], dict)

    run(main())


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("cap", "n", "ceiling"),
    [({"max_tokens": 150}, 1, 150), ({"max_completion_tokens": 200, "max_tokens": 300}, 2, 400)],
)
def test_completion_tokens_over_what_the_cap_allowed_are_the_cap(
    stream: bool, cap: dict[str, int], n: int, ceiling: int
) -> None:
    """An upstream that bills 10**8 completion tokens for an answer capped at 150 cannot charge a
    key's budget for them: the request allowed cap x n at most."""
    absurd = {"prompt_tokens": 20, "completion_tokens": 10**8, "total_tokens": 10**8 + 20}

    async def main() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            call = chat_call(stream=stream, n=n, **cap)
            if stream:
                up.reply = stream_of(TEXT, absurd)
                u = (await collect(backend.chat_stream(call)))[-1]["usage"]
            else:
                up.reply = completion(usage=absurd)
                u = (await backend.chat(call))["usage"]
            await backend.aclose()
            assert u["completion_tokens"] == ceiling and u["estimated"] is True
            assert u["total_tokens"] == 20 + ceiling

    run(main())
    # within the cap, an honest count is not touched
    within = {"prompt_tokens": 20, "completion_tokens": 140, "total_tokens": 160}

    async def honest() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            up.reply = completion(usage=within)
            u = (await backend.chat(chat_call(max_tokens=150)))["usage"]
            await backend.aclose()
            assert u == within

    run(honest())


def test_honest_usage_passes_unchanged() -> None:
    async def main() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            detailed = {**HONEST, "prompt_tokens_details": {"cached_tokens": 4}}
            up.reply = completion(usage=detailed)
            call = chat_call()
            out = await backend.chat(call)
            assert out["usage"] == detailed and "usage_estimated" not in call.metadata

            up.reply = completion(
                usage={"prompt_tokens": 20.0, "completion_tokens": 100.0, "total_tokens": None}
            )
            call = chat_call()
            out = await backend.chat(call)  # whole floats are counts; a missing total is the sum
            assert out["usage"] == HONEST and type(out["usage"]["prompt_tokens"]) is int
            assert "usage_estimated" not in call.metadata

            up.reply = stream_of(TEXT, HONEST)
            call = chat_call(stream=True)
            chunks = await collect(backend.chat_stream(call))
            assert chunks[-1]["usage"] == HONEST and "usage_estimated" not in call.metadata
            await backend.aclose()

    run(main())


def test_a_plausible_low_count_is_kept_and_an_implausible_prompt_is_estimated() -> None:
    async def main() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            # 500 bytes in 40 tokens (12.5 bytes a token) is unusual but possible: kept
            up.reply = completion(usage={"prompt_tokens": 20, "completion_tokens": 40, "total_tokens": 60})
            call = chat_call()
            out = await backend.chat(call)
            assert out["usage"]["completion_tokens"] == 40 and "usage_estimated" not in call.metadata

            # a 3,000-byte prompt reported as 0 tokens: the prompt is the gateway's estimate
            up.reply = completion(usage={"prompt_tokens": 0, "completion_tokens": 100, "total_tokens": 100})
            call = chat_call("lorem ipsum " * 250)
            out = await backend.chat(call)
            u = out["usage"]
            assert u["prompt_tokens"] == backend.count_prompt_tokens("chat", call)
            assert u["completion_tokens"] == 100 and u["estimated"] is True
            assert call.metadata["usage_estimated"] is True
            await backend.aclose()

    run(main())


def test_continuous_usage_on_every_chunk_is_checked_per_chunk() -> None:
    """vLLM's `continuous_usage_stats`: every chunk carries the usage so far."""

    async def main() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            bad = {"prompt_tokens": None, "completion_tokens": "1", "total_tokens": None}
            up.reply = sse(
                chunk({"role": "assistant", "content": "hello"}, usage=bad),
                chunk({"content": " world"}, usage=bad),
                chunk({}, "stop", usage="garbage"),
            )
            call = chat_call(stream=True)
            chunks = await collect(backend.chat_stream(call))
            await backend.aclose()
            for c in chunks:
                if c.get("usage") is not None:
                    assert_sane(c["usage"])
            final = chunks[-1]["usage"]
            assert final["estimated"] is True and call.metadata["usage_estimated"] is True
            assert final["completion_tokens"] >= 2  # two content-bearing deltas

    run(main())


def test_completions_and_embeddings_usage_are_checked_too() -> None:
    async def main() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            up.reply = {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": "up-model",
                "choices": [{"index": 0, "text": TEXT, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": None, "completion_tokens": -3, "total_tokens": None},
            }
            call = Call({"model": "m", "prompt": "say"}, "up-model", "r")
            out = await backend.completion(call)
            assert_sane(out["usage"])
            assert out["usage"]["completion_tokens"] >= 125 and call.metadata["usage_estimated"] is True

            up.reply = {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                "model": "up-model",
                "usage": {"prompt_tokens": None, "completion_tokens": "x", "total_tokens": None},
            }
            call = Call({"model": "m", "input": "some words to embed"}, "up-model", "r")
            emb = await backend.embeddings(call)
            u = emb["usage"]
            assert type(u["prompt_tokens"]) is int and u["prompt_tokens"] >= 1
            assert u["total_tokens"] == u["prompt_tokens"] and "completion_tokens" not in u
            assert u["estimated"] is True and call.metadata["usage_estimated"] is True
            await backend.aclose()

    run(main())


def test_an_upstream_gateway_that_says_its_usage_was_estimated_is_believed() -> None:
    """Steward in front of Steward: the inner gateway's `estimated` mark carries through."""

    async def main() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            up.reply = completion(usage={**HONEST, "estimated": True})
            call = chat_call()
            out = await backend.chat(call)
            assert out["usage"]["estimated"] is True and call.metadata["usage_estimated"] is True
            up.reply = completion(usage={**HONEST, "estimated": "no"})
            call = chat_call()
            out = await backend.chat(call)
            assert out["usage"] == HONEST and "usage_estimated" not in call.metadata
            await backend.aclose()

    run(main())


def test_the_floors_leave_honest_answers_alone() -> None:
    """Text the prompt may not hold (a JSON schema that only constrains decoding), a prompt the
    request asks the upstream to truncate, and an echoed prompt do not make honest usage look low."""

    async def main() -> None:
        async with Scripted() as up:
            backend = make(up.url)
            schema = {"type": "object", "description": "x" * 5000}
            up.reply = completion(usage=HONEST)
            call = chat_call(response_format={"type": "json_schema", "json_schema": {"schema": schema}})
            assert (await backend.chat(call))["usage"] == HONEST and "usage_estimated" not in call.metadata

            up.reply = completion(usage={"prompt_tokens": 5, "completion_tokens": 100, "total_tokens": 105})
            call = chat_call("lorem ipsum " * 250, truncate_prompt_tokens=5)
            out = await backend.chat(call)
            assert out["usage"]["prompt_tokens"] == 5 and "usage_estimated" not in call.metadata

            long_prompt = "lorem ipsum " * 250
            up.reply = {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": "up-model",
                "choices": [{"index": 0, "text": long_prompt + "yes", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 500, "completion_tokens": 1, "total_tokens": 501},
            }
            call = Call({"model": "m", "prompt": long_prompt, "echo": True}, "up-model", "r")
            out = await backend.completion(call)
            assert out["usage"]["completion_tokens"] == 1 and "usage_estimated" not in call.metadata
            call = Call({"model": "m", "prompt": long_prompt}, "up-model", "r")  # the same, not echoed
            out = await backend.completion(call)
            assert out["usage"]["estimated"] is True and out["usage"]["completion_tokens"] >= 750
            await backend.aclose()

    run(main())


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "inf"},
        {"retry-after": "1e400"},
        {"retry-after": "nan"},
        {"retry-after-ms": "inf"},
        {"retry-after-ms": "1e400"},
        {"retry-after": "1e12"},
        {"retry-after-ms": "1e15"},
    ],
)
def test_a_retry_after_that_is_not_finite_or_absurd_is_refused_or_capped(headers: dict[str, str]) -> None:
    from steward.backends.openai import MAX_RETRY_AFTER_S, _parse_retry_after

    value = _parse_retry_after(headers)
    assert value is None or (math.isfinite(value) and 0 <= value <= MAX_RETRY_AFTER_S), value
