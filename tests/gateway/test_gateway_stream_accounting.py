"""What a stream costs and how it ends, with guards off: the budget counts tokens (not SSE events), a
budget cut finishes every choice and the audit payload holds exactly what the client got, Retry-After
survives on streamed requests (rounded up), and a large prompt is tokenised off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway_harness import Running, free_port, start_gateway
from steward.gateway.settings import ModelRoute, Settings


class Scripted:
    """An OpenAI-compatible upstream answering each request with `script(body)`: a `web.Response`
    as it is, or a list of chunks as an SSE stream ending in `[DONE]`."""

    def __init__(self) -> None:
        self.script: Callable[[dict[str, Any]], Any] = lambda body: []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        ready = threading.Event()

        async def handle(request: web.Request) -> web.StreamResponse:
            out = self.script(await request.json())
            if isinstance(out, web.StreamResponse):
                return out
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for c in out:
                await resp.write(b"data: " + json.dumps(c).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            ready.set()
            await asyncio.Event().wait()

        threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
        assert ready.wait(10)


def chunk(delta: dict[str, Any], index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def usage(completion: int) -> dict[str, Any]:
    u = {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion}
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [],
        "usage": u,
    }


@pytest.fixture(scope="module")
def up() -> Scripted:
    return Scripted()


@pytest.fixture(scope="module")
def gw(up: Scripted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, list[Any]]]:
    route = ModelRoute(name="m", backend="openai", base_url=up.url, upstream_model="up", max_retries=0)
    settings = Settings(
        data_dir=Path(tmp_path_factory.mktemp("acct")),
        port=free_port(),
        models=[route],
        embedding_model="",
        guards=False,
    )
    records: list[Any] = []
    for running in start_gateway(settings):
        gateway: Any = running.gateway
        inner = gateway.on_finish

        def keep(trace: Any, inner: Any = inner) -> Any:
            records.append(trace)
            return inner(trace) if inner is not None else None

        gateway.on_finish = keep
        yield running, records


def sse(running: Running, key: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body, "stream": True}
    h = {"authorization": f"Bearer {key}"}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=full, headers=h, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]


def text_of(events: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or ""
        for e in events
        for c in e.get("choices") or []
        if c["index"] == index
    )


def test_the_stream_budget_counts_tokens_not_events(gw: Any, up: Scripted) -> None:
    piece = "lorem ipsum " * 25  # ~75 tokens in each event
    up.script = lambda body: (
        [chunk({"content": piece}) for _ in range(60)]
        + [
            chunk({}, finish="stop"),
            usage(60 * 75),
        ]
    )
    running, _ = gw
    key = running.key("acme", "user", limits=[{"kind": "tokens", "window": "day", "limit": 600}])
    events = sse(running, key, {"stream_options": {"include_usage": True}})
    spent = [e["usage"] for e in events if e.get("usage")][-1]
    assert spent["total_tokens"] <= 600 + 256 + 75
    assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] == ["length"]


def test_a_budget_cut_finishes_every_choice_and_stores_what_was_sent(gw: Any, up: Scripted) -> None:
    def script(body: dict[str, Any]) -> Any:
        out = []
        for i in range(400):  # one choice per chunk, interleaved, as vLLM sends them
            out += [chunk({"content": f"a{i} "}, index=0), chunk({"content": f"b{i} "}, index=1)]
        return [*out, chunk({}, 0, "stop"), chunk({}, 1, "stop"), usage(800)]

    up.script = script
    running, records = gw
    key = running.key("acme", "user", limits=[{"kind": "tokens", "window": "day", "limit": 600}])
    events = sse(running, key, {"n": 2})
    reasons = {c["index"]: c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")}
    assert reasons == {0: "length", 1: "length"}
    stored = records[-1].payload["response"]
    assert stored == {str(i): text_of(events, i) for i in (0, 1)} and stored["1"]
    assert records[-1].outcome == "cut"


@pytest.mark.parametrize("stream", [False, True])
def test_retry_after_reaches_the_client_rounded_up(gw: Any, up: Scripted, stream: bool) -> None:
    running, _ = gw
    h = {"authorization": f"Bearer {running.key('acme', 'user')}"}
    for header, expected in (({"retry-after": "3"}, "3"), ({"retry-after-ms": "400"}, "1")):
        up.script = lambda body, header=header: web.json_response(
            {"error": {"message": "slow down"}}, status=429, headers=header
        )
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": stream}
        r = httpx.post(running.url + "/v1/chat/completions", json=body, headers=h, timeout=30)
        assert r.status_code == 503 and r.headers.get("retry-after") == expected, (header, r.headers)


def test_a_large_prompt_is_tokenised_off_the_event_loop(gw: Any, up: Scripted) -> None:
    running, _ = gw
    gateway: Any = running.gateway
    backend = gateway.models["m"].backend
    on_loop: list[bool] = []
    count = backend.count_prompt_tokens

    def spy(*a: Any, **kw: Any) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a worker thread: no event loop runs here
            on_loop.append(False)
        return count(*a, **kw)

    backend.count_prompt_tokens = spy
    try:
        up.script = lambda body: [chunk({"content": "ok"}), chunk({}, finish="stop"), usage(1)]
        key = running.key("acme", "user")
        sse(running, key, {"messages": [{"role": "user", "content": "a " * 50_000}]})
    finally:
        del backend.count_prompt_tokens
    assert on_loop and on_loop[0] is False  # the gateway's count (the backend may count again, cheaply)


def test_a_prompt_no_context_could_hold_is_refused_without_tokenising(gw: Any, up: Scripted) -> None:
    """An in-process tokenizer holds the GIL, so a thread alone does not keep a megabyte prompt from
    stalling the worker: one far longer than the context can hold is refused before it is read."""
    import dataclasses

    running, _ = gw
    gateway: Any = running.gateway
    entry = gateway.models["m"]
    backend = entry.backend
    counted: list[int] = []
    count = backend.count_prompt_tokens

    def spy(*a: Any, **kw: Any) -> Any:
        counted.append(1)
        return count(*a, **kw)

    backend.count_prompt_tokens = spy
    backend.max_new_tokens = lambda route, call: 16  # as an in-process backend answers
    gateway.models["m"] = dataclasses.replace(entry, info=dataclasses.replace(entry.info, context_length=256))
    try:
        h = {"authorization": f"Bearer {running.key('acme', 'user')}"}
        for stream in (False, True):
            body = {"model": "m", "messages": [{"role": "user", "content": "a " * 500_000}], "stream": stream}
            r = httpx.post(running.url + "/v1/chat/completions", json=body, headers=h, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert r.json()["error"]["param"] == "messages" and not counted
    finally:
        gateway.models["m"] = entry
        del backend.count_prompt_tokens, backend.max_new_tokens
