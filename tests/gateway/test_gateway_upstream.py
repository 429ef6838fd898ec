"""The gateway in front of OpenAI-compatible upstreams (real HTTP on loopback): pass-through,
streaming, error mapping, retries and the fallback chain, seen through the `openai` client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway_harness import Running, ThreadedUpstream, free_port, start_gateway
from steward.gateway.settings import ModelRoute, Settings


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
    # 256 tokens were reserved up front; the next chunk of 256 would cross 400, so the stream stops
    n_words = len("".join(words).split())
    assert reasons[-1] == "length" and 200 < n_words < 400
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
