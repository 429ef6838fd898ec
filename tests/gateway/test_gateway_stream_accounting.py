"""What a stream costs and how it ends, with guards off: the budget counts tokens (not SSE events), a
budget cut finishes every choice and the audit payload holds exactly what the client got, Retry-After
survives on streamed requests (rounded up), and a large prompt is tokenised off the event loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway_harness import Running, ScriptedUpstream, free_port, start_gateway, start_recording
from steward.gateway.settings import ModelRoute, Settings

Scripted = ScriptedUpstream


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
    yield from start_recording(settings)


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
    key = running.key("acme", "user", limits=[{"kind": "tokens", "window": "month", "limit": 600}])
    events = sse(running, key, {"stream_options": {"include_usage": True}})
    spent = [e["usage"] for e in events if e.get("usage")][-1]
    assert spent["total_tokens"] <= 600 + 256 + 75
    assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] == ["length"]


@pytest.mark.parametrize("unit", ["lorem ipsum ", "żółć ", "😀"])
def test_one_huge_event_is_trimmed_to_the_budget(gw: Any, up: Scripted, unit: str) -> None:
    """The event that crosses the budget is cut to what the budget allows (bytes / 4 tokens), not
    sent whole: one 192 KB event on a 600-token key."""
    big = unit * (192_000 // len(unit.encode()))
    up.script = lambda body: [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": big}),
        chunk({}, finish="stop"),
        usage(48_000),
    ]
    running, records = gw
    key = running.key("acme", "user", limits=[{"kind": "tokens", "window": "month", "limit": 600}])
    events = sse(running, key, {"stream_options": {"include_usage": True}})
    got = text_of(events)
    assert got and big.startswith(got) and len(got.encode()) <= (600 + 256) * 4
    assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] == ["length"]
    spent = [e["usage"] for e in events if e.get("usage")][-1]
    assert spent["total_tokens"] <= 600 + 256
    assert records[-1].outcome == "cut" and records[-1].payload["response"] == {"0": got}


def test_a_crossing_event_of_several_choices_is_trimmed_in_each(gw: Any, up: Scripted) -> None:
    def script(body: dict[str, Any]) -> Any:
        both = chunk({"content": "a" * 50_000}, index=0)
        both["choices"].append({"index": 1, "delta": {"content": "b" * 50_000}, "finish_reason": "stop"})
        return [both, chunk({}, 0, "stop"), usage(25_000)]

    up.script = script
    running, records = gw
    key = running.key("acme", "user", limits=[{"kind": "tokens", "window": "month", "limit": 600}])
    events = sse(running, key, {"n": 2})
    reasons = {c["index"]: c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")}
    assert reasons == {0: "length", 1: "length"}
    sent = text_of(events, 0) + text_of(events, 1)
    assert len(sent) <= (600 + 256) * 4
    assert records[-1].payload["response"] == {
        str(i): text_of(events, i) for i in (0, 1) if text_of(events, i)
    }


def test_a_budget_cut_finishes_every_choice_and_stores_what_was_sent(gw: Any, up: Scripted) -> None:
    def script(body: dict[str, Any]) -> Any:
        out = []
        for i in range(400):  # one choice per chunk, interleaved, as vLLM sends them
            out += [chunk({"content": f"a{i} "}, index=0), chunk({"content": f"b{i} "}, index=1)]
        return [*out, chunk({}, 0, "stop"), chunk({}, 1, "stop"), usage(800)]

    up.script = script
    running, records = gw
    key = running.key("acme", "user", limits=[{"kind": "tokens", "window": "month", "limit": 600}])
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


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "header", [{"retry-after": "inf"}, {"retry-after": "1e400"}, {"retry-after-ms": "inf"}]
)
def test_a_retry_after_that_is_not_finite_is_no_internal_error(
    gw: Any, up: Scripted, stream: bool, header: dict[str, str]
) -> None:
    running, _ = gw
    h = {"authorization": f"Bearer {running.key('acme', 'user')}"}
    up.script = lambda body: web.json_response(
        {"error": {"message": "slow down"}}, status=429, headers=header
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    r = httpx.post(running.url + "/v1/chat/completions", json=body, headers=h, timeout=30)
    assert r.status_code == 503, (header, r.status_code, r.text)
    wait = r.headers.get("retry-after")
    assert wait is None or 0 <= int(wait) <= 3600


def test_an_infinite_wait_is_capped_when_rounded() -> None:
    from steward.backends.base import BackendError
    from steward.gateway.service import _api_error

    for value in (float("inf"), float("nan"), 1e300):
        err = _api_error(BackendError("slow down", status=503, retry_after=value))
        wait = (err.headers or {}).get("retry-after")
        assert wait is None or 0 <= int(wait) <= 3600, (value, wait)


@pytest.mark.parametrize("bad", [None, "0", 0.5, True, [0]])
def test_a_chunk_without_a_valid_index_is_choice_0_of_a_single_choice_stream(
    gw: Any, up: Scripted, bad: Any
) -> None:
    def script(body: dict[str, Any]) -> Any:
        first, last = chunk({"content": "hello "}), chunk({"content": "world"})
        first["choices"][0]["index"] = bad
        del last["choices"][0]["index"]
        return [first, last, chunk({}, finish="stop"), usage(2)]

    up.script = script
    running, records = gw
    events = sse(running, running.key("acme", "user"), {})
    assert not [e for e in events if "error" in e]
    assert text_of(events) == "hello world"
    assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] == ["stop"]
    assert records[-1].outcome == "ok" and records[-1].payload["response"] == {"0": "hello world"}


def test_a_chunk_without_a_valid_index_ends_a_multi_choice_stream_with_an_upstream_error(
    gw: Any, up: Scripted
) -> None:
    def script(body: dict[str, Any]) -> Any:
        bad = chunk({"content": "b"}, index=1)
        bad["choices"][0]["index"] = None
        return [chunk({"content": "a"}, index=0), bad, chunk({}, 0, "stop"), chunk({}, 1, "stop"), usage(2)]

    up.script = script
    running, records = gw
    events = sse(running, running.key("acme", "user"), {"n": 2})
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and errors[0]["type"] == "upstream_error", events
    assert records[-1].status == 502 and records[-1].outcome == "error"
    assert text_of(events, 0) == "a"


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


@pytest.fixture(scope="module")
def guarded(up: Scripted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    route = ModelRoute(name="m", backend="openai", base_url=up.url, upstream_model="up", max_retries=0)
    data = Path(tmp_path_factory.mktemp("acct-guarded"))
    settings = Settings(data_dir=data, port=free_port(), models=[route], embedding_model="")
    yield from start_gateway(settings)


def test_a_guarded_stream_releases_nothing_past_the_budget_at_the_cut(guarded: Running, up: Scripted) -> None:
    """With guards on, the crossing event is cut before the guard holds it: the text the guard
    releases when the budget ends the stream is only what the budget allowed."""
    big = "lorem ipsum " * 16_000
    up.script = lambda body: [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": big}),
        usage(48_000),
    ]
    key = guarded.key("acme", "user", limits=[{"kind": "tokens", "window": "month", "limit": 600}])
    events = sse(guarded, key, {})
    got = text_of(events)
    assert got and big.startswith(got) and len(got.encode()) <= (600 + 256) * 4
    assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] == ["length"]


def test_trimming_cuts_only_generated_strings_and_keeps_the_shape() -> None:
    from steward.gateway.service import _generated_bytes, _trim_choices

    choices: list[Any] = [
        {
            "index": 0,
            "delta": {
                "role": "assistant",
                "content": [{"type": "text", "text": "x" * 30}],
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": "y" * 30},
                    }
                ],
            },
            "logprobs": {"content": [{"token": "x"}]},
            "finish_reason": "tool_calls",
        }
    ]
    _trim_choices(choices, 33)
    c = choices[0]
    delta = c["delta"]
    assert delta["role"] == "assistant" and delta["content"] == [{"type": "text", "text": "x" * 30}]
    call = delta["tool_calls"][0]
    assert (call["index"], call["id"], call["type"]) == (0, "call_1", "function")
    assert call["function"] == {"name": "", "arguments": "yyy"}  # a name that does not fit whole is dropped
    assert _generated_bytes(c) <= 33 and c["finish_reason"] is None and not c["logprobs"]


def test_the_stream_payload_joins_field_pieces_once_and_merges_tool_calls_by_index() -> None:
    """What a stream's audit payload records of its other fields: pieces kept as they came and
    joined once (40,000 reasoning pieces were a quadratic string build on the event loop)."""
    from steward.gateway.service import _Delivered

    d = _Delivered()
    n = 40_000
    for _ in range(n):
        d.record({"choices": [{"index": 0, "delta": {"reasoning_content": "ab"}}]})
    call = {"index": 1, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    d.record({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    for piece in ('{"a"', ": 1}"):
        d.record(
            {
                "choices": [
                    {"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": piece}}]}}
                ]
            }
        )
    d.record({"choices": [{"index": 0, "delta": {"content": "done"}, "finish_reason": "stop"}]})
    out = d.payload({"messages": []})
    fields = out["response_fields"]["0"]
    assert fields["reasoning_content"] == "ab" * n
    assert fields["tool_calls"] == [
        {"index": 1, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert out["response"] == {"0": "done"} and d.finished == {0}


def test_fields_the_guard_has_no_name_for_count_against_the_budget_and_reach_the_payload() -> None:
    """`audio.transcript`, `reasoning_details[].text` and the like are generated text: counted
    by a stream's budget, trimmed (or dropped) at a cut, and kept in the audit payload."""
    from steward.gateway.service import _Delivered, _generated_bytes, _trim_choices

    delta = {
        "role": "assistant",
        "audio": {"id": "a1", "transcript": "x" * 30},
        "reasoning_details": [{"type": "reasoning.text", "text": "y" * 20, "index": 0}],
        "future": {"note": "z" * 10},
    }
    choice: dict[str, Any] = {"index": 0, "delta": json.loads(json.dumps(delta)), "finish_reason": "stop"}
    assert _generated_bytes(choice) == 60  # ids and type tags are the server's, not counted
    _trim_choices([choice], 35)
    assert _generated_bytes(choice) <= 35 and choice["delta"]["role"] == "assistant"
    assert choice["finish_reason"] is None

    d = _Delivered()
    for piece in ({"audio": {"id": "a1", "transcript": "hel"}}, {"audio": {"transcript": "lo"}}):
        d.record({"choices": [{"index": 0, "delta": piece}]})
    d.record({"choices": [{"index": 0, "delta": {"reasoning_details": delta["reasoning_details"]}}]})
    fields = d.payload({"messages": []})["response_fields"]["0"]
    assert fields["audio"] == {"id": "a1", "transcript": "hello"}
    assert fields["reasoning_details"] == delta["reasoning_details"]


def test_the_stream_payload_keeps_parallel_calls_without_an_index_apart() -> None:
    from steward.gateway.service import _Delivered

    d = _Delivered()
    for cid, name in (("call_a", "get_weather"), ("call_b", "get_time")):
        call = {"id": cid, "type": "function", "function": {"name": name, "arguments": "{}"}}
        d.record({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    calls = d.payload({"messages": []})["response_fields"]["0"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]


def test_an_event_orjson_refuses_still_goes_out_and_is_recorded_as_sent() -> None:
    """No path should still carry a lone surrogate into a stream event; if one does (or the
    upstream sends an integer past 64 bits), the event goes out, not a 500 that ends the stream."""
    from steward.gateway.service import _dumps_event

    data, sent = _dumps_event({"choices": [{"delta": {"content": "a \ud83d b"}}], "n": 2**70})
    assert json.loads(data) == sent == {"choices": [{"delta": {"content": "a \ufffd b"}}], "n": 2**70}
    ev = {"choices": []}
    assert _dumps_event(ev) == (b'{"choices":[]}', ev)
