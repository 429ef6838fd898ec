"""Limits through the gateway: reservations settle to the real usage, streams included; concurrency."""

from __future__ import annotations

import asyncio
import json

import httpx

from gateway_harness import Running

CHAT = "/v1/chat/completions"


def test_streams_and_calls_settle_to_real_usage(gateway: Running) -> None:
    key = gateway.key("exact", "user", limits=[{"kind": "tokens", "window": "day", "limit": 5000}])
    h = {"authorization": f"Bearer {key}"}
    body = {
        "model": "builtin",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 12,
    }
    usage = None
    with httpx.stream(
        "POST",
        gateway.url + CHAT,
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        headers=h,
        timeout=60,
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                usage = ev.get("usage") or usage
    assert usage is not None
    r2 = httpx.post(gateway.url + CHAT, json={**body, "max_tokens": 7}, headers=h, timeout=60)
    u2 = r2.json()["usage"]
    reserved2 = u2["prompt_tokens"] + 7
    # remaining after reserving request 2 = limit - (settled stream usage) - (request 2's reservation)
    assert int(r2.headers["x-ratelimit-remaining-tokens"]) == 5000 - usage["total_tokens"] - reserved2
    r3 = httpx.post(gateway.url + CHAT, json={**body, "max_tokens": 1}, headers=h, timeout=60)
    u3 = r3.json()["usage"]
    expect = 5000 - usage["total_tokens"] - u2["total_tokens"] - (u3["prompt_tokens"] + 1)
    assert int(r3.headers["x-ratelimit-remaining-tokens"]) == expect


def test_concurrency_limit(gateway: Running) -> None:
    key = gateway.key("conc", "user", limits=[{"kind": "concurrent", "limit": 1}])
    h = {"authorization": f"Bearer {key}"}
    body = {"model": "builtin", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 40}

    async def go() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:
            rs = await asyncio.gather(*[c.post(gateway.url + CHAT, json=body, headers=h) for _ in range(3)])
            after = await c.post(gateway.url + CHAT, json={**body, "max_tokens": 1}, headers=h)
        return [*sorted(r.status_code for r in rs), after.status_code]

    codes = asyncio.run(go())
    assert codes[:3].count(200) >= 1 and 429 in codes[:3]
    assert codes[3] == 200  # the slot was released when the requests finished


def test_limiter_failure_fails_closed(tmp_path: object) -> None:
    from pathlib import Path

    from gateway_harness import free_port, start_gateway
    from steward.gateway.settings import Settings

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = Settings(
        data_dir=Path(str(tmp_path)), port=free_port(), redis_url=dead, embedding_model="", max_batch=2
    )
    for gw in start_gateway(settings):
        key = gw.key("acme", "user", limits=[{"kind": "requests", "window": "day", "limit": 100}])
        body = {"model": "builtin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        r = httpx.post(gw.url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "limiter_unavailable"
