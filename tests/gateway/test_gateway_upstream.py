"""The gateway in front of OpenAI-compatible upstreams (real HTTP on loopback): pass-through,
streaming, error mapping, retries and the fallback chain, seen through the `openai` client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from gateway_harness import Running, ThreadedUpstream, auth, free_port, start_gateway
from steward.gateway.settings import ModelRoute, Settings

ANSWER = "word " * 100  # 500 bytes: ~100 tokens, and at least 16 by any tokenizer
# what the scripted upstream reports as usage, chosen by the request's last message
USAGES: dict[str, Any] = {
    "null": {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
    "strings": {"prompt_tokens": "5", "completion_tokens": "x", "total_tokens": "5x"},
    "empty": {},
    "negative": {"prompt_tokens": -50, "completion_tokens": 10, "total_tokens": -40},
    "honest": {"prompt_tokens": 20, "completion_tokens": 100, "total_tokens": 120},
}


class ScriptedUpstream:
    """An OpenAI-compatible upstream on its own thread that answers `ANSWER` with the usage
    `USAGES[last message]` (non-streamed, or streamed with the usage in the last event)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(30)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = USAGES[body["messages"][-1]["content"]]
        base = {"id": "chatcmpl-s", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER},
                "finish_reason": "stop",
            }
            out = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return web.json_response(out)
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ANSWER}}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": usage},
        ]
        wire = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        return web.Response(body=wire + b"data: [DONE]\n\n", content_type="text/event-stream")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[ThreadedUpstream, ThreadedUpstream, ThreadedUpstream]]:
    a = ThreadedUpstream(reply_text="alpha beta gamma delta")
    b = ThreadedUpstream(reply_text="from the fallback")
    long = ThreadedUpstream(reply_text=" ".join(f"w{i}" for i in range(600)))
    yield a, b, long
    for u in (a, b, long):
        u.close()


@pytest.fixture(scope="module")
def gw(
    upstreams: tuple[ThreadedUpstream, ThreadedUpstream, ThreadedUpstream],
    scripted: ScriptedUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Running]:
    a, b, long = upstreams
    dead = f"http://127.0.0.1:{free_port()}/v1"
    models = [
        ModelRoute(
            name="fake", backend="openai", base_url=a.up.url, upstream_model="fake-model", max_retries=2
        ),
        ModelRoute(
            name="backup", backend="openai", base_url=b.up.url, upstream_model="fake-model", max_retries=0
        ),
        ModelRoute(
            name="primary",
            backend="openai",
            base_url=dead,
            upstream_model="fake-model",
            max_retries=0,
            fallbacks=["backup"],
        ),
        ModelRoute(name="long", backend="openai", base_url=long.up.url, upstream_model="fake-model"),
        ModelRoute(
            name="scripted", backend="openai", base_url=scripted.url, upstream_model="s", max_retries=0
        ),
    ]
    settings = Settings(
        data_dir=Path(tmp_path_factory.mktemp("gwup")), port=free_port(), models=models, embedding_model=""
    )
    yield from start_gateway(settings)


def test_chat_passes_through_with_tools(
    gw: Running, upstreams: tuple[ThreadedUpstream, ThreadedUpstream, ThreadedUpstream]
) -> None:
    a = upstreams[0]
    key = gw.key("acme", "user")
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    r = c.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        tools=tools,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        max_tokens=3,
    )
    assert r.model == "fake" and r.choices[0].message.content == "alpha beta gamma"
    sent = a.up.seen[-1].body
    assert sent is not None and sent["model"] == "fake-model" and sent["tools"] == tools
    assert sent["response_format"] == {"type": "json_object"}
    assert "authorization" not in {k for k in a.up.seen[-1].headers if a.up.seen[-1].headers[k].endswith(key)}


def test_streaming_through_the_gateway(gw: Running) -> None:
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key("acme", "user"), max_retries=0)
    chunks = list(
        c.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.split() == ["alpha", "beta", "gamma", "delta"]
    assert chunks[-1].usage is not None and not chunks[-1].choices


def test_upstream_errors_map_and_retries_happen(
    gw: Running, upstreams: tuple[ThreadedUpstream, ThreadedUpstream, ThreadedUpstream]
) -> None:
    a = upstreams[0]
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key("acme", "user"), max_retries=0)
    before = a.up.attempts()
    a.up.fail(500, times=2)  # two failures, then the third attempt succeeds
    r = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content and a.up.attempts() - before == 3
    a.up.fail(400)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    a.up.fail(503, times=3)
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code in (502, 503)
    body = info.value.response.json()
    assert (
        set(body["error"]) == {"message", "type", "param", "code"}
        and "127.0.0.1" not in body["error"]["message"]
    )


def test_fallback_chain_answers_when_primary_is_down(gw: Running) -> None:
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key("acme", "user"), max_retries=0)
    r = c.chat.completions.create(model="primary", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "primary" and r.choices[0].message.content == "from the fallback"


def test_stream_without_max_tokens_is_cut_at_a_hard_token_cap(gw: Running) -> None:
    key = gw.key("capped", "user", limits=[{"kind": "tokens", "window": "day", "limit": 400}])
    h = {"authorization": f"Bearer {key}"}
    body = {"model": "long", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=h, timeout=30) as r:
        assert r.status_code == 200
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    words = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    reasons = [e["choices"][0].get("finish_reason") for e in events if e["choices"]]
    # 256 tokens were reserved up front; the next chunk of 256 would cross 400, so the stream stops.
    # Each word ("w123 ", 5 bytes) counts one token per event, or two at 4 bytes a token (the
    # gateway's running count since review 2's M2): either way well short of the 600 words.
    n_words = len("".join(words).split())
    assert reasons[-1] == "length" and 100 < n_words < 400
    # without a cap the same request streams all 600 words
    free = {"authorization": f"Bearer {gw.key('uncapped', 'user')}"}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=free, timeout=30) as r:
        evs = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in evs if e["choices"])
    assert text.split() == [f"w{i}" for i in range(600)]  # the guard released every scanned word, in order


def test_a_client_that_leaves_mid_stream_is_audited_as_cancelled(
    gw: Running, upstreams: tuple[ThreadedUpstream, ThreadedUpstream, ThreadedUpstream]
) -> None:
    from steward.backends.fake_upstream import Fault

    upstreams[0].up.add(Fault("trickle", seconds=0.5))
    key, auditor = gw.key("acme", "user"), gw.key("acme", "auditor")
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    started = time.monotonic()
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    ) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        first = next(r.iter_lines())
        assert first.startswith("data: {")  # one event arrived; the client now hangs up
    event = None
    while time.monotonic() - started < 20 and event is None:
        listed = httpx.get(
            gw.url + "/audit/events?limit=1000", headers={"authorization": f"Bearer {auditor}"}
        ).json()["data"]
        event = next((e for e in listed if e["request_id"] == rid), None)
        time.sleep(0.1)
    assert event is not None, "the abandoned stream left no audit record"
    assert event["outcome"] == "cancelled" and event["kind"] == "inference"
    # recorded when the client left, not after the upstream's whole 3-second answer
    assert time.monotonic() - started < 2.5


def _audit_event(gw: Running, auditor: str, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listed = httpx.get(gw.url + "/audit/events?limit=1000", headers=auth(auditor)).json()["data"]
        found = [e for e in listed if e["request_id"] == rid]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no audit record for {rid}")


def _scripted_chat(gw: Running, key: str, usage: str, stream: bool) -> tuple[httpx.Response, dict[str, Any]]:
    body: dict[str, Any] = {"model": "scripted", "messages": [{"role": "user", "content": usage}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text
    if not stream:
        return r, r.json()["usage"]
    events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    assert all("error" not in e for e in events), events[-1]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == ANSWER
    assert r.text.rstrip().endswith("data: [DONE]")
    return r, events[-1]["usage"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("usage", ["null", "strings", "negative", "empty"])
def test_upstream_usage_that_cannot_be_trusted_is_estimated_settled_and_audited(
    gw: Running, usage: str, stream: bool
) -> None:
    """Review 2, H3 and M1: null/non-numeric usage was a 500 after the upstream had answered (the
    reservation never settled, a stream lost its audit record); `{}` settled to 0 tokens; negative
    counts left the reservation unsettled and were shown to the client."""
    tenant = f"use-{usage}-{stream}"
    key = gw.key(tenant, "user", limits=[{"kind": "concurrent", "limit": 1}])
    auditor = gw.key(tenant, "auditor")
    for _ in range(2):  # the second request is only admitted if the first one's slot was freed
        r, u = _scripted_chat(gw, key, usage, stream)
        assert all(type(u[k]) is int and u[k] >= 0 for k in ("prompt_tokens", "completion_tokens"))
        assert u["completion_tokens"] >= 125 and u["estimated"] is True  # 500 bytes at ≤ 4 a token
        event = _audit_event(gw, auditor, r.headers["x-request-id"])
        assert event["outcome"] == "ok" and event["status"] == 200
        assert event["usage"]["completion_tokens"] == u["completion_tokens"]
        assert event["detail"]["usage_estimated"] is True


def test_honest_upstream_usage_is_settled_as_reported(gw: Running) -> None:
    key, auditor = gw.key("use-honest", "user"), gw.key("use-honest", "auditor")
    for stream in (False, True):
        r, u = _scripted_chat(gw, key, "honest", stream)
        assert u == USAGES["honest"]
        event = _audit_event(gw, auditor, r.headers["x-request-id"])
        assert event["usage"]["completion_tokens"] == 100 and "usage_estimated" not in event["detail"]


def test_empty_usage_does_not_make_requests_free(gw: Running) -> None:
    """Review 2, M1: with `usage: {}` a 1,000 tokens/day key was served 20 of 20 requests."""
    served = {}
    for usage in ("honest", "empty"):
        key = gw.key(f"budget-{usage}", "user", limits=[{"kind": "tokens", "window": "day", "limit": 1000}])
        body = {"model": "scripted", "messages": [{"role": "user", "content": usage}], "max_tokens": 120}
        served[usage] = sum(
            httpx.post(gw.url + "/v1/chat/completions", json=body, headers=auth(key), timeout=30).status_code
            == 200
            for _ in range(20)
        )
    assert served["empty"] <= served["honest"] < 20


def _trace(**kw: Any) -> Any:
    from steward.gateway.trace import Trace

    t = Trace(request_id="req-p", route="/v1/chat/completions", key_id="k1", tenant="acme", backend="openai")
    t.status, t.outcome = 200, "ok"
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def test_audit_event_records_what_the_backend_learnt() -> None:
    """Review 2, L2: which fallback member served, the upstream attempts and whether the usage was
    the gateway's estimate reach the audit event (`trace.extra["upstream"]` is the call's metadata)."""
    from steward.gateway.audit_sink import event_from_trace

    meta = {"served_by": "back", "fallbacks": 1, "upstream_attempts": 2, "usage_estimated": True}
    usage = {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11, "estimated": True}
    ev = event_from_trace(_trace(usage=usage, extra={"upstream": meta}))
    assert ev.detail["served_by"] == "back" and ev.detail["fallbacks"] == 1
    assert ev.detail["upstream_attempts"] == 2 and ev.detail["usage_estimated"] is True
    assert dict(ev.usage) == {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}

    # a stream the gateway cut marks only the usage (no upstream metadata): still recorded
    ev = event_from_trace(_trace(usage=usage))
    assert ev.detail["usage_estimated"] is True and "served_by" not in ev.detail

    # honest usage: no flag; odd values are left out, long names bounded, unknown keys ignored
    odd = {
        "served_by": "b" * 500,
        "fallbacks": "1",
        "upstream_attempts": -1,
        "usage_estimated": "yes",
        "x": 1,
    }
    ev = event_from_trace(_trace(usage={"prompt_tokens": 1}, extra={"upstream": odd}))
    assert ev.detail["served_by"] == "b" * 64
    assert not {"fallbacks", "upstream_attempts", "usage_estimated", "x"} & set(ev.detail)
    ev = event_from_trace(_trace(extra={"upstream": ["back"]}))
    assert "served_by" not in ev.detail
