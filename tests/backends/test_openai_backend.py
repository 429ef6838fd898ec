"""The `openai` backend against the fake upstream over real HTTP on loopback.

Each test runs its own event loop (`asyncio.run`; no pytest-asyncio needed) with a fake upstream on
a free port. Backoff sleeps are injected (recorded, not slept) and the jitter RNG is seeded, so the
retry tests are exact and fast.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from steward.backends.base import Backend, BackendError, Call
from steward.backends.fake_upstream import FakeUpstream, Fault
from steward.backends.openai import OpenAIBackend, OpenAIBackendConfig

CHAT = "/v1/chat/completions"


def run(coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Sleeps:
    """An injected `sleep` that records the requested delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def make(url: str, sleeps: Sleeps | None = None, seed: int = 0, **cfg: Any) -> OpenAIBackend:
    settings: dict[str, Any] = {
        "name": "up",
        "base_url": url,
        "models": {"m": "fake-model"},
        "api_key": "sk-upstream-secret",
        "backoff_base_s": 0.01,
        "backoff_cap_s": 0.05,
        **cfg,
    }
    return OpenAIBackend.from_config(settings, sleep=sleeps or Sleeps(), rng=random.Random(seed))


def chat_call(**body: Any) -> Call:
    return Call(
        body={"model": "m", "messages": [{"role": "user", "content": "hello there"}], **body},
        upstream_model="fake-model",
        request_id="req-1",
    )


async def collect(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c async for c in stream]


def with_upstream(
    fn: Callable[[FakeUpstream], Awaitable[None]], **kwargs: Any
) -> Callable[[], Coroutine[Any, Any, None]]:
    async def main() -> None:
        async with FakeUpstream(**kwargs) as up:
            await fn(up)

    return main


def test_satisfies_backend_protocol() -> None:
    assert isinstance(make("http://127.0.0.1:1/v1"), Backend)


def test_chat_passes_body_through_and_rewrites_model() -> None:
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}

    async def body(up: FakeUpstream) -> None:
        backend = make(up.url)
        await backend.start()
        call = chat_call(tools=tools, response_format=response_format, x_vendor_field={"a": [1, 2]}, seed=7)
        call.body["stream_options"] = {"include_usage": True}  # must not reach a non-stream upstream call
        out = await backend.chat(call)
        await backend.aclose()
        assert out["choices"][0]["message"]["content"] == "Hello from the fake upstream."
        assert out["usage"]["completion_tokens"] == 5
        assert "usage_estimated" not in call.metadata
        seen = up.seen[-1]
        assert seen.body is not None
        assert seen.body["model"] == "fake-model"
        assert seen.body["tools"] == tools
        assert seen.body["response_format"] == response_format
        assert seen.body["x_vendor_field"] == {"a": [1, 2]}
        assert seen.body["seed"] == 7
        assert "stream_options" not in seen.body
        assert seen.headers["authorization"] == "Bearer sk-upstream-secret"

    run(with_upstream(body)())


def test_completion_and_embeddings() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url, models={"m": "fake-model", "e": "fake-embed"})
        out = await backend.completion(
            Call({"model": "m", "prompt": "say", "max_tokens": 2}, "fake-model", "r")
        )
        assert out["object"] == "text_completion" and out["choices"][0]["text"] == "Hello from"
        chunks = await collect(
            backend.completion_stream(
                Call({"model": "m", "prompt": "say", "stream": True}, "fake-model", "r")
            )
        )
        assert (
            "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            == "Hello from the fake upstream."
        )
        assert chunks[-1]["usage"]["completion_tokens"] == 5
        emb = await backend.embeddings(Call({"model": "e", "input": ["a", "b"]}, "fake-embed", "r"))
        assert [d["index"] for d in emb["data"]] == [0, 1] and emb["usage"]["prompt_tokens"] == 2
        assert up.seen[-1].path == "/v1/embeddings" and up.seen[-1].body == {
            "model": "fake-embed",
            "input": ["a", "b"],
        }
        await backend.aclose()

    run(with_upstream(body)())


def test_discovery_at_start() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url, models={}, model_prefix="up/")
        await backend.start()
        infos = {m.id: m for m in backend.models()}
        assert set(infos) == {"up/fake-model", "up/fake-embed"}
        assert infos["up/fake-model"].context_length == 4096 and infos["up/fake-model"].backend == "openai"
        assert backend.upstream_model("up/fake-model") == "fake-model"
        await backend.aclose()

    run(with_upstream(body)())


def test_discovery_failure_is_a_clean_error() -> None:
    async def body(up: FakeUpstream) -> None:
        await up.stop()
        backend = make(up.url, models={}, connect_timeout_s=1)
        with pytest.raises(BackendError, match="cannot list the models"):
            await backend.start()
        await backend.aclose()

    run(with_upstream(body)())


def test_retries_5xx_with_full_jitter_backoff() -> None:
    async def body(up: FakeUpstream) -> None:
        sleeps = Sleeps()
        backend = make(up.url, sleeps, seed=42, max_retries=3, backoff_base_s=0.1, backoff_cap_s=0.3)
        up.fail(500, times=3)
        out = await backend.chat(call := chat_call())
        await backend.aclose()
        assert out["choices"]
        assert up.attempts() == 4 and call.metadata["upstream_attempts"] == 4
        assert len(sleeps.delays) == 3
        for i, d in enumerate(sleeps.delays):  # full jitter: uniform(0, min(cap, base * 2**i))
            assert 0.0 <= d <= min(0.3, 0.1 * 2**i)
        rng = random.Random(42)
        assert sleeps.delays == [rng.uniform(0, min(0.3, 0.1 * 2**i)) for i in range(3)]

    run(with_upstream(body)())


@pytest.mark.parametrize(
    ("upstream", "status", "etype"),
    [
        (500, 502, "upstream_error"),
        (502, 502, "upstream_error"),
        (503, 503, "upstream_error"),
        (504, 504, "timeout_error"),
    ],
)
def test_5xx_after_retries_maps_to_gateway_status(upstream: int, status: int, etype: str) -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url, max_retries=2)
        up.fail(upstream, times=10)
        with pytest.raises(BackendError) as ei:
            await backend.chat(chat_call())
        await backend.aclose()
        assert (ei.value.status, ei.value.type, ei.value.retryable) == (status, etype, True)
        assert up.attempts() == 3

    run(with_upstream(body)())


def test_retry_after_is_honoured() -> None:
    async def body(up: FakeUpstream) -> None:
        sleeps = Sleeps()
        backend = make(up.url, sleeps, backoff_base_s=0.001, backoff_cap_s=0.001)
        up.fail(429, retry_after="0.5")
        up.add(Fault("status", status=503, retry_after=None))
        out = await backend.chat(chat_call())
        assert out["choices"] and up.attempts() == 3
        assert sleeps.delays[0] == 0.5  # the header wins over a shorter backoff
        assert sleeps.delays[1] <= 0.001

        up.fail(429, times=5, retry_after="0.2")
        with pytest.raises(BackendError) as ei:
            await backend.chat(chat_call())
        assert (ei.value.status, ei.value.retryable, ei.value.retry_after) == (503, True, 0.2)
        await backend.aclose()

    run(with_upstream(body)())


def test_retry_after_beyond_the_cap_is_reported_not_waited() -> None:
    async def body(up: FakeUpstream) -> None:
        sleeps = Sleeps()
        backend = make(up.url, sleeps, max_retry_after_s=5)
        up.fail(429, retry_after=120)
        with pytest.raises(BackendError) as ei:
            await backend.chat(chat_call())
        await backend.aclose()
        assert sleeps.delays == [] and up.attempts() == 1 and ei.value.retry_after == 120

    run(with_upstream(body)())


@pytest.mark.parametrize(("upstream", "status"), [(400, 400), (404, 404), (413, 413), (422, 400)])
def test_no_retry_on_client_errors(upstream: int, status: int) -> None:
    async def body(up: FakeUpstream) -> None:
        sleeps = Sleeps()
        backend = make(up.url, sleeps)
        up.add(Fault("status", status=upstream, message="bad parameter: temperature"))
        with pytest.raises(BackendError) as ei:
            await backend.chat(chat_call())
        await backend.aclose()
        assert up.attempts() == 1 and sleeps.delays == []
        err = ei.value
        assert (err.status, err.retryable, err.message) == (status, False, "bad parameter: temperature")
        assert err.type == "invalid_request_error"
        assert backend.breaker.consecutive_failures == 0

    run(with_upstream(body)())


def test_upstream_auth_failure_is_a_gateway_error_and_hides_the_key() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url)
        up.fail(401)
        with pytest.raises(BackendError) as ei:
            await backend.chat(chat_call())
        await backend.aclose()
        assert ei.value.status == 502 and up.attempts() == 1
        assert "sk-upstream-secret" not in ei.value.message
        assert "sk-upstream-secret" not in repr(backend) + repr(backend.config)

    run(with_upstream(body)())


def test_connect_error_is_retried_then_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: connections are refused

    async def main() -> None:
        sleeps = Sleeps()
        backend = make(f"http://127.0.0.1:{port}/v1", sleeps, max_retries=2)
        with pytest.raises(BackendError) as ei:
            await backend.chat(call := chat_call())
        await backend.aclose()
        assert (ei.value.status, ei.value.retryable, ei.value.code) == (502, True, "upstream_unreachable")
        assert str(port) not in ei.value.message
        assert len(sleeps.delays) == 2 and call.metadata["upstream_attempts"] == 3

    run(main())


def test_read_timeout_on_a_hanging_upstream() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url, max_retries=1, read_timeout_s=0.2)
        up.add(Fault("hang"), times=2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(BackendError) as ei:
            await backend.chat(chat_call())
        assert (ei.value.status, ei.value.type, ei.value.retryable) == (504, "timeout_error", True)
        assert up.attempts() == 2 and loop.time() - t0 < 2.0
        await backend.aclose()

    run(with_upstream(body)())


def test_total_timeout_from_the_call() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url, max_retries=5)
        up.add(Fault("delay", seconds=1.0), times=10)
        call = chat_call()
        call.timeout_s = 0.3
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(BackendError) as ei:
            await backend.chat(call)
        assert ei.value.status == 504 and loop.time() - t0 < 1.0
        await backend.aclose()

    run(with_upstream(body)())


def test_malformed_json_is_a_clean_error() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url)
        up.add(Fault("malformed"))
        with pytest.raises(BackendError) as ei:
            await backend.chat(chat_call())
        assert (ei.value.status, ei.value.code) == (502, "upstream_malformed")
        assert (
            up.attempts() == 1
        )  # the same upstream would answer the same: no retry, but retryable elsewhere
        assert ei.value.retryable

        up.add(Fault("malformed", path="/v1/embeddings"))
        with pytest.raises(BackendError):
            await backend.embeddings(Call({"model": "e", "input": "x"}, "fake-embed", "r"))

        up.add(Fault("malformed"))
        chunks: list[dict[str, Any]] = []
        with pytest.raises(BackendError) as ei:
            async for c in backend.chat_stream(chat_call(stream=True)):
                chunks.append(c)
        assert len(chunks) == 1 and ei.value.code == "upstream_malformed"
        await backend.aclose()

    run(with_upstream(body)())


def test_stream_passes_chunks_and_forces_usage() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url)
        call = chat_call(stream=True, tools=[{"type": "function", "function": {"name": "g"}}])
        chunks = await collect(backend.chat_stream(call))
        await backend.aclose()
        seen = up.seen[-1].body
        assert seen is not None
        assert seen["stream"] is True and seen["stream_options"] == {"include_usage": True}
        assert seen["tools"] == call.body["tools"]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == "Hello from the fake upstream."
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
        assert "usage" not in chunks[-2] and "usage_estimated" not in call.metadata

    run(with_upstream(body)())


def test_stream_without_upstream_usage_gets_an_estimate() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url)
        up.add(Fault("no_usage"))
        call = chat_call(stream=True)
        chunks = await collect(backend.chat_stream(call))
        usage = chunks[-1]["usage"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["id"] == chunks[0]["id"]
        assert usage["completion_tokens"] == 8  # max(5 content deltas, ⌈29 bytes / 4⌉)
        assert usage["prompt_tokens"] == backend.count_prompt_tokens("chat", call)
        assert usage["total_tokens"] == usage["prompt_tokens"] + 8
        assert call.metadata["usage_estimated"] is True

        up.add(Fault("no_usage"))
        call = chat_call()
        out = await backend.chat(call)
        assert out["usage"]["completion_tokens"] >= 5 and call.metadata["usage_estimated"] is True
        await backend.aclose()

    run(with_upstream(body)())


def test_mid_stream_drop_raises_from_the_iterator_without_retry() -> None:
    async def body(up: FakeUpstream) -> None:
        sleeps = Sleeps()
        backend = make(up.url, sleeps, max_retries=3)
        up.add(Fault("drop", after_chunks=3))
        chunks: list[dict[str, Any]] = []
        with pytest.raises(BackendError) as ei:
            async for c in backend.chat_stream(chat_call(stream=True)):
                chunks.append(c)
        await backend.aclose()
        assert len(chunks) == 3
        assert ei.value.status == 502 and ei.value.retryable is False
        assert up.attempts() == 1 and sleeps.delays == []

    run(with_upstream(body)())


def test_stream_without_done_is_an_error() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url)
        up.add(Fault("drop", after_chunks=2))
        up.add(Fault("no_done"))  # no [DONE] but a finish_reason was seen: accepted
        with pytest.raises(BackendError):
            await collect(backend.chat_stream(chat_call(stream=True)))
        chunks = await collect(backend.chat_stream(chat_call(stream=True)))
        assert "usage" in chunks[-1]
        await backend.aclose()

    run(with_upstream(body)())


def test_stream_errors_before_the_first_byte_are_retried() -> None:
    async def body(up: FakeUpstream) -> None:
        sleeps = Sleeps()
        backend = make(up.url, sleeps, max_retries=3)
        up.fail(500)
        up.add(Fault("drop", after_chunks=0))
        up.fail(429, retry_after=0)
        chunks = await collect(backend.chat_stream(call := chat_call(stream=True)))
        await backend.aclose()
        assert "usage" in chunks[-1] and up.attempts() == 4 and len(sleeps.delays) == 3
        assert call.metadata["upstream_attempts"] == 4

    run(with_upstream(body)())


def test_stream_4xx_raises_before_the_first_chunk() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url)
        up.fail(400)
        stream = backend.chat_stream(chat_call(stream=True))
        with pytest.raises(BackendError) as ei:
            await stream.__anext__()
        assert ei.value.status == 400 and up.attempts() == 1
        await backend.aclose()

    run(with_upstream(body)())


def test_stream_error_event_from_upstream() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url)
        up.add(Fault("error_event", after_chunks=2, message="engine died"))
        chunks: list[dict[str, Any]] = []
        with pytest.raises(BackendError, match="engine died") as ei:
            async for c in backend.chat_stream(chat_call(stream=True)):
                chunks.append(c)
        assert len(chunks) == 2 and ei.value.status == 502
        await backend.aclose()

    run(with_upstream(body)())


def test_abandoned_stream_releases_the_connection() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url, max_connections=1)
        for _ in range(3):  # with a pool of one, a leaked connection would block the next stream
            stream = backend.chat_stream(chat_call(stream=True))
            first = await stream.__anext__()
            assert first["choices"]
            await stream.aclose()  # type: ignore[attr-defined]
        out = await backend.chat(chat_call())
        assert out["choices"] and backend.breaker.state == "closed"
        await backend.aclose()

    run(with_upstream(body)())


def test_concurrent_requests_share_the_pool() -> None:
    async def body(up: FakeUpstream) -> None:
        backend = make(up.url, max_connections=8)
        outs = await asyncio.gather(*(backend.chat(chat_call()) for _ in range(64)))
        assert len(outs) == 64 and up.attempts() == 64
        await backend.aclose()

    run(with_upstream(body)())


def test_count_prompt_tokens_is_a_cheap_upper_bound() -> None:
    backend = make("http://127.0.0.1:1")
    assert backend.config.base_url == "http://127.0.0.1:1/v1"
    text = "word " * 300  # 1500 bytes; real BPE tokenisers give ~300 tokens
    n = backend.count_prompt_tokens("chat", chat_call(messages=[{"role": "user", "content": text}]))
    assert n == 3 + 4 + 500
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    parts = [{"type": "text", "text": "what is this?"}, image]
    n_img = backend.count_prompt_tokens("chat", chat_call(messages=[{"role": "user", "content": parts}]))
    assert n_img == 3 + 4 + 1024 + 5
    assert backend.count_prompt_tokens("completions", Call({"prompt": [1, 2, 3, 4]}, "m", "r")) == 4
    assert backend.count_prompt_tokens("completions", Call({"prompt": ["ab", "cd"]}, "m", "r")) == 2
    cjk = "数据" * 30  # 180 bytes
    assert backend.count_prompt_tokens("completions", Call({"prompt": cjk}, "m", "r")) == 60
    with_tools = chat_call(
        tools=[{"type": "function", "function": {"name": "lookup", "description": "x" * 90}}]
    )
    assert backend.count_prompt_tokens("chat", with_tools) > backend.count_prompt_tokens("chat", chat_call())


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        OpenAIBackendConfig.model_validate({"base_url": "localhost:8000"})
    with pytest.raises(ValueError):
        OpenAIBackendConfig.model_validate({"base_url": "http://x/v1", "max_retries": -1})
    with pytest.raises(ValueError):
        OpenAIBackendConfig.model_validate({"base_url": "http://x/v1", "unknown": 1})


class _Content:
    """Stands in for `aiohttp.ClientResponse.content`: yields the given pieces as network reads."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def iter_any(self) -> AsyncIterator[bytes]:
        for p in self.pieces:
            yield p


class _Resp:
    def __init__(self, pieces: list[bytes]) -> None:
        self.content = _Content(pieces)


def _parse(pieces: list[bytes]) -> list[dict[str, Any]]:
    backend = make("http://127.0.0.1:1/v1")
    return run(collect(backend._chunks(_Resp(pieces), "chat", chat_call(stream=True))))  # type: ignore[arg-type]


def test_sse_parser_handles_splits_crlf_comments_and_multiline_data() -> None:
    usage = b'{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
    wire = (
        b": keep-alive comment\r\n\r\n"
        b'event: message\r\ndata: {"id":"c","choices":[{"index":0,"delta":{"content":"h\\u00e9"}}]}\r\n\r\n'
        b'data: {"id":"c",\ndata: "choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}\n\n'
        b"data: " + usage + b"\n\n"
        b"data: [DONE]"  # no trailing blank line: still the end
    )
    for size in (1, 3, 7, len(wire)):  # every way the network might cut it
        pieces = [wire[i : i + size] for i in range(0, len(wire), size)]
        chunks = _parse(pieces)
        assert [c["choices"][0]["delta"]["content"] for c in chunks[:2]] == ["hé", "!"]
        assert chunks[-1]["usage"]["total_tokens"] == 3 and len(chunks) == 3


def test_sse_parser_rejects_truncated_and_garbage_streams() -> None:
    with pytest.raises(BackendError, match="ended before"):
        _parse([b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'])
    with pytest.raises(BackendError, match="not a JSON object"):
        _parse([b"data: [1, 2]\n\n"])
    with pytest.raises(BackendError, match="not a JSON object"):
        _parse([b"data: \xff\xfe\n\n"])
    assert _parse([b"data: [DONE]\n\n"])[-1]["usage"]["completion_tokens"] == 0  # empty answer, estimate


def test_fake_upstream_control_api_and_cli() -> None:
    import subprocess
    import sys
    import time

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "steward.backends.fake_upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)

        async def main() -> None:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{base}/_control/faults", json={"kind": "status", "status": 503}
                ) as r:
                    assert (await r.json())["queued"] == 1
                backend = make(f"{base}/v1", max_retries=0)
                with pytest.raises(BackendError) as ei:
                    await backend.chat(chat_call())
                assert ei.value.status == 503
                assert (await backend.chat(chat_call()))["choices"]
                await backend.aclose()
                async with session.get(f"{base}/_control/stats") as r:
                    assert (await r.json())["counts"]["/v1/chat/completions"] == 2

        run(main())
    finally:
        proc.terminate()
        proc.wait(5)


def test_a_lone_surrogate_escape_from_the_upstream_is_decoded_as_a_replacement_character() -> None:
    """orjson refuses `"\\ud83d"` with no pair; the standard library's fallback decodes it to a
    lone surrogate, which no UTF-8 encoder takes downstream (a 500 mid-stream, no audit record)."""
    import orjson

    from steward.backends.openai import _loads_object

    got = _loads_object(b'{"choices": [{"delta": {"content": "hi \\ud83d there", "\\udc00k": 1}}]}')
    assert got == {"choices": [{"delta": {"content": "hi \ufffd there", "\ufffdk": 1}}]}
    assert orjson.dumps(got)
    assert _loads_object(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a pair is one character
