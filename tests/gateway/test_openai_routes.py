"""The gateway against the official `openai` client: chat, streaming, completions, embeddings, models."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

from gateway_harness import Running


def client(gw: Running, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=120)


MSG = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_chat_non_streaming_with_headers(gateway: Running, user_key: str) -> None:
    c = client(gateway, user_key)
    raw = c.chat.completions.with_raw_response.create(model="builtin", messages=MSG, max_tokens=12, seed=3)
    r = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-steward-overhead-ms"]) >= 0
    assert r.object == "chat.completion" and r.model == "builtin"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u is not None and u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_stream_equals_non_stream_and_usage_only_when_asked(gateway: Running, user_key: str) -> None:
    c = client(gateway, user_key)
    whole = c.chat.completions.create(model="builtin", messages=MSG, max_tokens=20, seed=11, temperature=0.8)
    parts, usage, finish = [], None, None
    for ch in c.chat.completions.create(
        model="builtin",
        messages=MSG,
        max_tokens=20,
        seed=11,
        temperature=0.8,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        else:
            usage = ch.usage
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    plain = list(c.chat.completions.create(model="builtin", messages=MSG, max_tokens=5, seed=1, stream=True))
    assert all(ch.usage is None for ch in plain) and all(ch.choices for ch in plain)


def test_async_client_concurrent_requests(gateway: Running, user_key: str) -> None:
    async def go() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=user_key, max_retries=0, timeout=120)
        rs = await asyncio.gather(
            *[
                ac.chat.completions.create(
                    model="builtin",
                    messages=[{"role": "user", "content": f"Count to {i}"}],
                    max_tokens=8,
                    seed=i,
                )
                for i in range(6)
            ]
        )
        stream = await ac.chat.completions.create(
            model="builtin", messages=MSG, max_tokens=6, seed=2, stream=True
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        await ac.close()
        return [r.choices[0].message.content or "" for r in rs] + [text]

    out = asyncio.run(go())
    assert len(out) == 7 and all(isinstance(t, str) for t in out)


def test_n_choices_and_logprobs(gateway: Running, user_key: str) -> None:
    c = client(gateway, user_key)
    one = c.chat.completions.create(model="builtin", messages=MSG, max_tokens=10, seed=5)
    three = c.chat.completions.create(model="builtin", messages=MSG, max_tokens=10, seed=5, n=3)
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == one.choices[0].message.content
    lp = c.chat.completions.create(
        model="builtin", messages=MSG, max_tokens=6, seed=5, logprobs=True, top_logprobs=3, temperature=0
    )
    content = lp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) <= 6
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert math.isclose(t.logprob, max(a.logprob for a in t.top_logprobs), abs_tol=1e-5)


def test_completions_and_models(gateway: Running, user_key: str) -> None:
    c = client(gateway, user_key)
    r = c.completions.create(model="builtin", prompt=["Once upon a time", "The sea"], max_tokens=5, seed=1)
    assert r.object == "text_completion" and len(r.choices) == 2
    assert r.usage is not None and r.usage.completion_tokens <= 10
    ids = {m.id for m in c.models.list()}
    assert {"builtin", "all-minilm-l6-v2"} <= ids
    assert c.models.retrieve("builtin").id == "builtin"


def test_embeddings_match_the_encoder(gateway: Running, user_key: str) -> None:
    from steward.model.embedding import SentenceEncoder

    texts = ["A man is playing a guitar.", "Der Himmel ist blau.", "数据隐私很重要"]
    r = client(gateway, user_key).embeddings.create(model="all-minilm-l6-v2", input=texts)
    ref = SentenceEncoder().encode(texts)
    assert [d.index for d in r.data] == [0, 1, 2]
    for d, v in zip(r.data, ref, strict=True):
        got = d.embedding
        dot = sum(a * b for a, b in zip(got, v.tolist(), strict=True))
        assert dot > 0.9999 and len(got) == 384
    b64 = client(gateway, user_key).embeddings.create(
        model="all-minilm-l6-v2", input="hi", encoding_format="base64"
    )
    import base64
    import struct

    raw = base64.b64decode(b64.data[0].embedding)  # type: ignore[arg-type]
    vec = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(vec) == 384 and abs(sum(x * x for x in vec) - 1) < 1e-4


def test_seed_through_batching_is_identical(gateway: Running, user_key: str) -> None:
    """20 prompts × 32 tokens: alone, then 8 at a time concurrently; greedy and sampled."""
    prompts = [f"Tell me fact number {i} about rivers and oceans." for i in range(20)]
    backend = gateway.gateway.models["builtin"].backend  # type: ignore[attr-defined]

    async def one(ac: openai.AsyncOpenAI, p: str, temperature: float, seed: int | None = 1234) -> str:
        r = await ac.chat.completions.create(
            model="builtin",
            messages=[{"role": "user", "content": p}],
            max_tokens=32,
            seed=seed,
            temperature=temperature,
        )
        return r.choices[0].message.content or ""

    async def go(temperature: float) -> tuple[list[str], list[str], int]:
        ac = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=user_key, max_retries=0, timeout=300)
        alone = [await one(ac, p, temperature) for p in prompts]
        before = backend.batches
        together: list[str] = []
        for i in range(0, 20, 8):
            together += await asyncio.gather(*[one(ac, p, temperature) for p in prompts[i : i + 8]])
        batches = backend.batches - before
        await ac.close()
        return alone, together, batches

    for temperature in (0.0, 1.0):
        alone, together, batches = asyncio.run(go(temperature))
        assert alone == together
        # by construction: a seeded request never shares a forward pass (steward.backends.builtin)
        assert batches == 20

    async def unseeded() -> int:
        ac = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=user_key, max_retries=0, timeout=300)
        before = backend.batches
        await asyncio.gather(*[one(ac, p, 0.0, seed=None) for p in prompts[:8]])
        await ac.close()
        return int(backend.batches - before)

    assert asyncio.run(unseeded()) < 8  # requests without a seed still share forward passes


def test_health_and_ready_need_no_key(gateway: Running) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(gateway.url + "/readyz")
    # Ready, and nothing about the models to a caller without a key (/v1/models filters by key).
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_metrics_need_admin(gateway: Running, user_key: str, admin_key: str) -> None:
    assert httpx.get(gateway.url + "/metrics").status_code == 401
    # Every tenant's volume: an auditor reads one tenant's records, so not these.
    for key in (user_key, gateway.key("acme", "auditor")):
        r = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 403
    r = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {admin_key}"})
    assert r.status_code == 200 and "steward_requests_total" in r.text


@pytest.mark.parametrize("role", ["user", "admin"])
def test_roles_that_may_infer(gateway: Running, role: str) -> None:
    k = gateway.key("acme", role)
    r = client(gateway, k).chat.completions.create(model="builtin", messages=MSG, max_tokens=2)
    assert r.choices
