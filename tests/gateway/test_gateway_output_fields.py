"""The output policy covers every text field the model produces, not just `content`.

Tool-call arguments (whole and streamed), the legacy `function_call`, `refusal`, `reasoning_content`
and content given as parts are scanned: blocked, redacted and restored like content. Logprobs never
carry text the guard changed or withheld, and a stream's are held with their text. A non-streamed
answer the output guard cuts is audited `blocked`, as a streamed one is.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_harness import Running, ScriptedUpstream, free_port, start_recording
from steward.gateway.settings import ModelRoute, Settings
from steward.guard import Vault

AWS = "AKIAIOSFODNN7EXAMPLE"
EMAIL = "john.smith@example.com"
SYSTEM = "You are a helpful assistant for Acme. Keep answers short."
Script = Callable[[dict[str, Any]], Any]


Scripted = ScriptedUpstream


def answer(content: Any, finish: str = "stop", logprobs: Any = None, **msg: Any) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": content, **msg},
        "finish_reason": finish,
    }
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "up",
        "choices": [choice],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
    }


def chunk(delta: dict[str, Any], index: int = 0, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish, **extra}],
    }


def usage() -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45},
    }


def lp(tokens: list[str]) -> dict[str, Any]:
    entries = [{"token": t, "logprob": -0.1, "bytes": list(t.encode()), "top_logprobs": []} for t in tokens]
    return {"content": entries, "refusal": None}


def call(args: str, name: str = "send") -> list[dict[str, Any]]:
    return [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}]


def canary_of(body: dict[str, Any]) -> str:
    m = re.search(r"stw-canary-[0-9a-f]+", json.dumps(body["messages"]))
    assert m is not None
    return m.group(0)


@pytest.fixture(scope="module")
def up() -> Scripted:
    return Scripted()


@pytest.fixture(scope="module")
def gw(up: Scripted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, list[Any]]]:
    data = Path(tmp_path_factory.mktemp("fields"))
    route = ModelRoute(name="m", backend="openai", base_url=up.url, upstream_model="up", max_retries=0)
    settings = Settings(data_dir=data, port=free_port(), models=[route], embedding_model="")
    yield from start_recording(settings)


def post(gw: tuple[Running, list[Any]], body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    running, _ = gw
    h = {"authorization": f"Bearer {key or running.key('acme', 'user')}"}
    r = httpx.post(running.url + "/v1/chat/completions", json={"model": "m", **body}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def stream(
    gw: tuple[Running, list[Any]], body: dict[str, Any], key: str | None = None
) -> list[dict[str, Any]]:
    running, _ = gw
    h = {"authorization": f"Bearer {key or running.key('acme', 'user')}"}
    full = {"model": "m", **body, "stream": True}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=full, headers=h, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def streamed(events: list[dict[str, Any]], field: str, index: int = 0) -> str:
    return "".join(
        (c.get("delta") or {}).get(field) or ""
        for e in events
        for c in e.get("choices") or []
        if c["index"] == index
    )


def streamed_args(events: list[dict[str, Any]]) -> str:
    return "".join(
        (t.get("function") or {}).get("arguments") or ""
        for e in events
        for c in e.get("choices") or []
        for t in (c.get("delta") or {}).get("tool_calls") or []
    )


def finishes(events: list[dict[str, Any]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in events:
        for c in e.get("choices") or []:
            if c.get("finish_reason"):
                out.setdefault(c["index"], []).append(c["finish_reason"])
    return out


def last_trace(gw: tuple[Running, list[Any]]) -> Any:
    return gw[1][-1]


def outputs(trace: Any) -> dict[str, dict[str, Any]]:
    return {g.get("field", "?"): g for g in trace.guard if g["stage"] == "output"}


def test_every_generated_field_of_an_answer_is_redacted(gw: Any, up: Scripted) -> None:
    up.script = lambda body: answer(
        [{"type": "text", "text": f"key {AWS}"}],
        refusal=f"I will not use {AWS}",
        reasoning_content=f"the key is {AWS}",
        tool_calls=call(json.dumps({"key": AWS})),
        function_call={"name": "send", "arguments": json.dumps({"k": AWS})},
    )
    out = post(gw, {"messages": [{"role": "user", "content": "hi"}]})
    assert AWS not in json.dumps(out)
    msg = out["choices"][0]["message"]
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"key": "[AWS_ACCESS_KEY]"}
    assert json.loads(msg["function_call"]["arguments"]) == {"k": "[AWS_ACCESS_KEY]"}
    assert msg["refusal"] == "I will not use [AWS_ACCESS_KEY]"
    assert msg["reasoning_content"] == "the key is [AWS_ACCESS_KEY]"
    assert msg["content"] == [{"type": "text", "text": "key [AWS_ACCESS_KEY]"}]
    scanned = outputs(last_trace(gw))
    for field in ("refusal", "reasoning_content", "content[0]", "tool_calls[0].function.arguments"):
        assert scanned[field]["scanned"] is True and scanned[field]["action"] == "redact", field


def test_a_leak_in_tool_arguments_cuts_the_choice_and_is_audited_blocked(gw: Any, up: Scripted) -> None:
    up.script = lambda body: answer(
        None,
        finish="tool_calls",
        logprobs=lp(["x"]),
        tool_calls=call(json.dumps({"q": f"[{canary_of(body)}]"})),
    )
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    out = post(gw, {"messages": msgs, "logprobs": True})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "content_filter" and "stw-canary" not in json.dumps(out)
    assert "tool_calls" not in choice["message"] and choice["logprobs"] is None
    assert last_trace(gw).outcome == "blocked"  # as the same block in a stream is
    from steward.gateway.audit_sink import event_from_trace

    recorded = event_from_trace(last_trace(gw)).detail["guard"]
    entry = next(g for g in recorded if g.get("field") == "tool_calls[0].function.arguments")
    assert entry["stage"] == "output" and entry["action"] == "block"


def test_pseudonyms_in_tool_arguments_are_restored(gw: Any, up: Scripted) -> None:
    def script(body: dict[str, Any]) -> Any:
        seen = body["messages"][-1]["content"]
        token = re.search(r"<EMAIL_ADDRESS_\d+>", seen)
        assert token is not None and EMAIL not in seen
        args = json.dumps({"to": token.group(0)})
        if not body.get("stream"):
            return answer(None, finish="tool_calls", tool_calls=call(args))
        first = {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "send", "arguments": ""},
        }
        return [
            chunk({"role": "assistant", "content": None, "tool_calls": [first]}),
            *[
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 4]}}]})
                for i in range(0, len(args), 4)
            ],
            chunk({}, finish="tool_calls"),
            usage(),
        ]

    up.script = script
    msgs = [{"role": "user", "content": f"Send an email to {EMAIL} saying the invoice is paid."}]
    out = post(gw, {"messages": msgs})
    assert json.loads(out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"to": EMAIL}
    events = stream(gw, {"messages": msgs})
    assert json.loads(streamed_args(events)) == {"to": EMAIL}
    assert finishes(events) == {0: ["tool_calls"]}


def test_restored_values_are_json_escaped_inside_arguments() -> None:
    from steward.gateway.guarding import restore_json

    vault = Vault()
    token = vault.pseudonym("PERSON", 'Ann "Red" O\\Lee')
    args = json.dumps({"name": token, "note": "plain"})
    assert json.loads(restore_json(args, vault)) == {"name": 'Ann "Red" O\\Lee', "note": "plain"}
    assert restore_json(args, None) == args
    cut_short = args[:-2]  # not JSON (a stream cut at its token budget): each token, escaped
    assert restore_json(cut_short, vault) == json.dumps({"name": 'Ann "Red" O\\Lee', "note": "plain"})[:-2]


def test_streamed_tool_calls_and_reasoning_are_scanned_and_reported(gw: Any, up: Scripted) -> None:
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "send", "arguments": ""}}
    up.script = lambda body: [
        chunk({"role": "assistant", "reasoning_content": f"the key is {AWS}"}),
        chunk({"content": None, "tool_calls": [first]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"key": "' + AWS[:9]}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": AWS[9:] + '"}'}}]}),
        chunk({}, finish="tool_calls"),
        usage(),
    ]
    events = stream(gw, {"messages": [{"role": "user", "content": "hi"}]})
    assert AWS not in json.dumps(events)
    assert json.loads(streamed_args(events)) == {"key": "[AWS_ACCESS_KEY]"}
    assert streamed(events, "reasoning_content") == "the key is [AWS_ACCESS_KEY]"
    assert finishes(events) == {0: ["tool_calls"]}
    trace = last_trace(gw)
    scanned = outputs(trace)
    assert scanned["reasoning_content"]["scanned"] is True
    assert scanned["tool_calls[0].function.arguments"]["scanned"] is True
    assert scanned["tool_calls[0].function.arguments"]["action"] == "redact"
    stored = json.dumps(trace.payload)
    assert "[AWS_ACCESS_KEY]" in stored and AWS not in stored and "tool_calls" in stored


def test_a_streamed_tool_call_that_leaks_is_never_sent(gw: Any, up: Scripted) -> None:
    def script(body: dict[str, Any]) -> Any:
        args = json.dumps({"q": f"[{canary_of(body)}]"})
        tc = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "send", "arguments": args}}
        return [chunk({"role": "assistant", "tool_calls": [tc]}), chunk({}, finish="tool_calls"), usage()]

    up.script = script
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    events = stream(gw, {"messages": msgs})
    assert "stw-canary" not in json.dumps(events) and streamed_args(events) == ""
    assert finishes(events) == {0: ["content_filter"]}
    assert last_trace(gw).outcome == "blocked"


def test_logprobs_of_a_redacted_or_blocked_answer_are_not_returned(gw: Any, up: Scripted) -> None:
    toks = ["my ", "key ", "is ", AWS]
    up.script = lambda body: answer("".join(toks), logprobs=lp(toks))
    out = post(gw, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    assert AWS not in json.dumps(out) and out["choices"][0]["logprobs"] is None
    clean = ["a ", "calm ", "river"]
    up.script = lambda body: answer("".join(clean), logprobs=lp(clean))
    out = post(gw, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    assert [e["token"] for e in out["choices"][0]["logprobs"]["content"]] == clean


def test_streamed_logprobs_travel_with_their_released_text(gw: Any, up: Scripted) -> None:
    clean = ["filler words "] * 45 + ["end"]
    up.script = lambda body: [
        *[chunk({"content": t}, logprobs=lp([t])) for t in clean],
        chunk({}, finish="stop"),
        usage(),
    ]
    events = stream(gw, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    tokens: list[str] = []
    for e in events:
        for c in e.get("choices") or []:
            if c.get("logprobs"):
                tokens += [x["token"] for x in c["logprobs"]["content"]]
            # what a chunk's logprobs describe never runs ahead of the text sent so far
            assert "".join(tokens) in streamed(events[: events.index(e) + 1], "content")
    assert tokens == clean and streamed(events, "content") == "".join(clean)

    secret = ["filler words "] * 29 + [AWS, " end"]
    up.script = lambda body: [
        *[chunk({"content": t}, logprobs=lp([t])) for t in secret],
        chunk({}, finish="stop"),
        usage(),
    ]
    events = stream(gw, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    assert AWS not in json.dumps(events) and "[AWS_ACCESS_KEY]" in streamed(events, "content")
    tokens = [
        x["token"]
        for e in events
        for c in e["choices"]
        if c.get("logprobs")
        for x in c["logprobs"]["content"]
    ]
    assert tokens and set(tokens) <= {"filler words ", " end"}


def test_a_stream_without_a_finish_reason_still_releases_its_tail(gw: Any, up: Scripted) -> None:
    story = "The quick brown fox jumps over the lazy dog. " * 12
    up.script = lambda body: (
        [chunk({"content": story[i : i + 6]}) for i in range(0, len(story), 6)] + [usage()]
    )
    events = stream(gw, {"messages": [{"role": "user", "content": "Tell me a story."}]})
    assert streamed(events, "content") == story
    assert outputs(last_trace(gw))["content"]["scanned"] is True


def test_a_budget_cut_finishes_every_guarded_choice(gw: Any, up: Scripted) -> None:
    def script(body: dict[str, Any]) -> Any:
        out = []
        for i in range(400):
            out += [chunk({"content": f"a{i} "}, index=0), chunk({"content": f"b{i} "}, index=1)]
        return [*out, chunk({}, 0, "stop"), chunk({}, 1, "stop"), usage()]

    up.script = script
    running, records = gw
    key = running.key("acme", "user", limits=[{"kind": "tokens", "window": "month", "limit": 600}])
    events = stream(gw, {"messages": [{"role": "user", "content": "x"}], "n": 2}, key=key)
    assert finishes(events) == {0: ["length"], 1: ["length"]}
    stored = records[-1].payload["response"]
    assert {i: streamed(events, "content", i) for i in (0, 1)} == {int(k): v for k, v in stored.items()}
    assert all(stored[k] for k in ("0", "1"))


def test_a_completion_streams_logprobs_with_its_text_and_masks_a_secret(gw: Any, up: Scripted) -> None:
    words = ["the ", "key ", "is ", AWS, " ok"] + ["and more words "] * 40

    def piece(t: str) -> dict[str, Any]:
        lps = {"tokens": [t], "token_logprobs": [-0.1], "top_logprobs": [{t: -0.1}], "text_offset": [0]}
        choice = {"index": 0, "text": t, "logprobs": lps, "finish_reason": None}
        return {"id": "c1", "object": "text_completion", "created": 1, "model": "up", "choices": [choice]}

    end = {"id": "c1", "object": "text_completion", "created": 1, "model": "up"}
    up.script = lambda body: [
        *map(piece, words),
        {**end, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
    ]
    running, _ = gw
    h = {"authorization": f"Bearer {running.key('acme', 'user')}"}
    body = {"model": "m", "prompt": "say", "logprobs": 1, "stream": True}
    with httpx.stream("POST", running.url + "/v1/completions", json=body, headers=h, timeout=60) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    text = "".join(c.get("text") or "" for e in events for c in e["choices"])
    tokens = [t for e in events for c in e["choices"] if c.get("logprobs") for t in c["logprobs"]["tokens"]]
    assert AWS not in json.dumps(events) and text == "".join(words).replace(AWS, "[AWS_ACCESS_KEY]")
    # each chunk's logprobs go out with its text, except those of the release the mask changed
    assert AWS not in tokens and set(tokens) <= set(words) and len(tokens) >= 20, tokens


# -- one answer's fields are judged together, and share the request's vault ------------------------

# 20 words (16 word 5-grams, none of them text the prompt tells the model to say): either half alone
# repeats 6 of them, under the minimum of 8; both halves repeat 12, three quarters of the prompt.
LEAK_SYSTEM = (
    "You are Zeta, the internal billing assistant of Northwind Traders. "
    "Escalate refunds above five hundred dollars to the finance desk."
)
HALF_1 = "You are Zeta, the internal billing assistant of Northwind Traders."
HALF_2 = "Escalate refunds above five hundred dollars to the finance desk."
OTHER = "jane.doe@example.org"


def leak_msgs() -> list[dict[str, Any]]:
    return [{"role": "system", "content": LEAK_SYSTEM}, {"role": "user", "content": "What can you do?"}]


def streamed_call(args: str, name: str = "send", step: int = 7) -> list[dict[str, Any]]:
    """The chunks of one streamed tool call: opened with its name, arguments in pieces."""
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}
    return [
        chunk({"content": None, "tool_calls": [first]}),
        *[
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + step]}}]})
            for i in range(0, len(args), step)
        ],
    ]


def pieces(field: str, text: str, step: int = 6) -> list[dict[str, Any]]:
    return [chunk({field: text[i : i + step]}) for i in range(0, len(text), step)]


def test_a_prompt_leaked_half_in_content_and_half_in_tool_arguments_is_blocked(gw: Any, up: Scripted) -> None:
    args = json.dumps({"note": HALF_2})
    up.script = lambda body: answer(HALF_1, finish="tool_calls", tool_calls=call(json.dumps({"q": "x"})))
    out = post(gw, {"messages": leak_msgs()})
    assert out["choices"][0]["finish_reason"] == "tool_calls"  # half the prompt alone is no leak
    up.script = lambda body: answer(HALF_1, finish="tool_calls", tool_calls=call(args))
    out = post(gw, {"messages": leak_msgs()})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "content_filter", choice
    assert "tool_calls" not in choice["message"] and "Zeta" not in json.dumps(out)
    assert last_trace(gw).outcome == "blocked"
    blocked = outputs(last_trace(gw))["tool_calls[0].function.arguments"]
    assert blocked["action"] == "block"


def test_a_prompt_leaked_half_in_reasoning_and_half_in_content_is_blocked(gw: Any, up: Scripted) -> None:
    up.script = lambda body: answer(HALF_2, reasoning_content=HALF_1)
    out = post(gw, {"messages": leak_msgs()})
    assert out["choices"][0]["finish_reason"] == "content_filter"
    assert "finance desk" not in json.dumps(out) and last_trace(gw).outcome == "blocked"
    up.script = lambda body: answer([{"type": "text", "text": HALF_1}, {"type": "text", "text": HALF_2}])
    out = post(gw, {"messages": leak_msgs()})
    assert out["choices"][0]["finish_reason"] == "content_filter"  # content parts add up too


def test_a_streamed_prompt_leak_split_between_content_and_tool_arguments_is_cut(
    gw: Any, up: Scripted
) -> None:
    args = json.dumps({"note": HALF_2})
    up.script = lambda body: [
        chunk({"role": "assistant", "content": ""}),
        *pieces("content", HALF_1),
        *streamed_call(args),
        chunk({}, finish="tool_calls"),
        usage(),
    ]
    events = stream(gw, {"messages": leak_msgs()})
    assert finishes(events) == {0: ["content_filter"]}
    assert streamed_args(events) == "" and "finance desk" not in json.dumps(events)
    assert last_trace(gw).outcome == "blocked"


def test_a_streamed_prompt_leak_split_between_reasoning_and_content_is_cut(gw: Any, up: Scripted) -> None:
    up.script = lambda body: [
        chunk({"role": "assistant", "content": ""}),
        *pieces("reasoning_content", HALF_1),
        *pieces("content", HALF_2),
        chunk({}, finish="stop"),
        usage(),
    ]
    events = stream(gw, {"messages": leak_msgs()})
    assert finishes(events) == {0: ["content_filter"]}
    assert "finance desk" not in streamed(events, "content")
    assert last_trace(gw).outcome == "blocked"
    up.script = lambda body: [  # either half alone still streams through
        chunk({"role": "assistant", "content": ""}),
        *pieces("reasoning_content", HALF_1),
        *pieces("content", "Happy to help with billing."),
        chunk({}, finish="stop"),
        usage(),
    ]
    events = stream(gw, {"messages": leak_msgs()})
    assert finishes(events) == {0: ["stop"]} and streamed(events, "reasoning_content") == HALF_1


PSEUDO_POLICY = """\
version: 1
policies:
  default:
    fail_closed: true
    restore_pseudonyms: true
    input:
      - {scanner: secrets, action: redact, redaction: mask}
      - {scanner: pii, action: redact, redaction: pseudonym, quasi_action: flag}
    output:
      - {scanner: prompt_leak, action: block, threshold: 0.3}
      - {scanner: secrets, action: redact, redaction: mask}
      - {scanner: pii, action: redact, redaction: pseudonym, quasi_action: allow}
bindings: []
"""


@pytest.fixture(scope="module")
def pgw(up: Scripted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, list[Any]]]:
    """A gateway whose output policy pseudonymises PII (rather than masking it)."""
    data = Path(tmp_path_factory.mktemp("pseudo"))
    policy = data / "policy.yaml"
    policy.write_text(PSEUDO_POLICY)
    route = ModelRoute(name="m", backend="openai", base_url=up.url, upstream_model="up", max_retries=0)
    settings = Settings(
        data_dir=data, port=free_port(), models=[route], embedding_model="", guard_policies=policy
    )
    yield from start_recording(settings)


def token_of(body: dict[str, Any]) -> str:
    m = re.search(r"<EMAIL_ADDRESS_\d+>", body["messages"][-1]["content"])
    assert m is not None and EMAIL not in body["messages"][-1]["content"]
    return m.group(0)


def answer_or_stream(body: dict[str, Any], content: str | None, args: str) -> Any:
    if not body.get("stream"):
        return answer(content, finish="tool_calls", tool_calls=call(args))
    return [
        chunk({"role": "assistant", "content": ""}),
        *(pieces("content", content) if content else []),
        *streamed_call(args),
        chunk({}, finish="tool_calls"),
        usage(),
    ]


def both_ways(gw: Any, msgs: list[dict[str, Any]]) -> list[tuple[str | None, str]]:
    """(content, tool-call arguments) the client gets, non-streamed then streamed."""
    out = post(gw, {"messages": msgs})["choices"][0]["message"]
    events = stream(gw, {"messages": msgs})
    assert finishes(events) == {0: ["tool_calls"]}
    return [
        (out["content"], out["tool_calls"][0]["function"]["arguments"]),
        (streamed(events, "content"), streamed_args(events)),
    ]


def test_an_output_pseudonym_never_takes_the_users_token(pgw: Any, up: Scripted) -> None:
    up.script = lambda body: answer_or_stream(body, None, json.dumps({"to": token_of(body), "cc": OTHER}))
    msgs = [{"role": "user", "content": f"Mail {EMAIL} the invoice."}]
    for _, args in both_ways(pgw, msgs):
        got = json.loads(args)
        assert got["to"] == EMAIL, args  # the user's own value, restored
        # the answer's own address is pseudonymised under a token of its own, never restored
        assert re.fullmatch(r"<EMAIL_ADDRESS_\d+>", got["cc"]) and got["cc"] != "<EMAIL_ADDRESS_1>", args
        assert OTHER not in args


def test_output_pseudonyms_of_one_answer_never_collide_across_fields(pgw: Any, up: Scripted) -> None:
    up.script = lambda body: answer_or_stream(body, f"I will write to {OTHER} ", json.dumps({"cc": EMAIL}))
    msgs = [{"role": "user", "content": "Who gets the invoice?"}]  # no PII in the request
    for content, args in both_ways(pgw, msgs):
        assert content is not None and OTHER not in content and EMAIL not in args
        mine = re.findall(r"<EMAIL_ADDRESS_\d+>", content)
        theirs = json.loads(args)["cc"]
        assert len(mine) == 1 and re.fullmatch(r"<EMAIL_ADDRESS_\d+>", theirs)
        assert mine[0] != theirs, (content, args)  # two addresses, two tokens


def test_a_users_email_is_restored_json_escaped_in_tool_arguments(pgw: Any, up: Scripted) -> None:
    odd = "o'brien.müller@example.com"

    def script(body: dict[str, Any]) -> Any:
        tok = re.search(r"<EMAIL_ADDRESS_\d+>", body["messages"][-1]["content"])
        assert tok is not None and odd not in json.dumps(body["messages"], ensure_ascii=False)
        t = tok.group(0)
        go = t.replace("<", "\\u003c").replace(">", "\\u003e")  # how Go's encoder writes the token
        args = f'{{"to": "{t}", "note": "write to {t} today", "raw": "{go}"}}'
        return answer_or_stream(body, None, args)

    up.script = script
    msgs = [{"role": "user", "content": f"Mail {odd} the invoice."}]
    for _, args in both_ways(pgw, msgs):
        assert json.loads(args) == {"to": odd, "note": f"write to {odd} today", "raw": odd}, args


def test_guard_restores_values_json_escaped_into_arguments() -> None:
    from steward.gateway.guarding import Guard, InputResult
    from steward.guard import ScanContext

    guard = Guard(
        {
            "version": 1,
            "policies": {
                "default": {
                    "restore_pseudonyms": True,
                    "input": [{"scanner": "pii", "action": "redact", "redaction": "pseudonym"}],
                    "output": [{"scanner": "pii", "action": "redact", "redaction": "pseudonym"}],
                }
            },
        }
    )
    vault = Vault()
    token = vault.pseudonym("PERSON", 'Ann "Red" O\\Lee', "user")
    hidden = vault.pseudonym("PERSON", "Bob Secret", "system")
    inp = InputResult(ScanContext(), vault)
    args = json.dumps({"name": token, "alias": f"{token.lower()} and {hidden}", "cc": OTHER})
    s = asyncio.run(guard.scan_field(args, inp, json_text=True, leak_state={}))
    assert s.text is not None and s.changed
    got = json.loads(s.text)
    assert got["name"] == 'Ann "Red" O\\Lee' and got["alias"] == f'Ann "Red" O\\Lee and {hidden}'
    assert re.fullmatch(r"<EMAIL_ADDRESS_\d+>", got["cc"])
    assert vault.origins(got["cc"]) == {"output"}  # pseudonymised into the request's vault


def _secrets_guard() -> Any:
    from steward.gateway.guarding import Guard

    return Guard(
        {
            "version": 1,
            "policies": {
                "default": {
                    "fail_closed": True,
                    "restore_pseudonyms": True,
                    "input": [],
                    "output": [{"scanner": "secrets", "action": "redact", "redaction": "mask"}],
                }
            },
        }
    )


def _inp() -> Any:
    from steward.gateway.guarding import InputResult, request_vault
    from steward.guard import ScanContext

    return InputResult(ScanContext(), request_vault())


def _scan(out: dict[str, Any]) -> list[dict[str, Any]]:
    from steward.gateway.trace import Trace

    trace = Trace(request_id="r", route="POST /v1/chat/completions")
    asyncio.run(_secrets_guard().scan_output("chat", out, _inp(), trace))
    return trace.guard


def _message(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", **fields}}]}


def _stream_chunks(
    deltas: list[dict[str, Any]], finish: str = "tool_calls", **extra: Any
) -> list[dict[str, Any]]:
    base = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    scan = _secrets_guard().stream(_inp(), "chat", 1)

    async def go() -> list[dict[str, Any]]:
        out = []
        for d in deltas:
            out += await scan.chunk(
                {**base, "choices": [{"index": 0, "delta": d, "finish_reason": None, **extra}]}
            )
        out += await scan.chunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        return out

    events = asyncio.run(go())
    events.append({"reports": scan.reports()})
    return events


def test_custom_tool_calls_object_arguments_and_refusal_parts_are_redacted() -> None:
    custom = {"id": "c1", "type": "custom", "custom": {"name": "shell", "input": f"export KEY={AWS}"}}
    out = _message(content=None, tool_calls=[custom])
    trace = _scan(out)
    assert AWS not in json.dumps(out) and "[AWS_ACCESS_KEY]" in json.dumps(out)
    assert any(e["field"] == "tool_calls[0].custom.input" for e in trace)

    fn = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"key": AWS, "n": 3}}}
    out = _message(content=None, tool_calls=[fn])
    _scan(out)
    args = out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert args == {"key": "[AWS_ACCESS_KEY]", "n": 3}  # still an object

    out = _message(content=[{"type": "refusal", "refusal": f"I cannot share {AWS}"}])
    _scan(out)
    assert out["choices"][0]["message"]["content"] == [
        {"type": "refusal", "refusal": "I cannot share [AWS_ACCESS_KEY]"}
    ]

    # a call of a shape nobody knows yet: its strings are scanned all the same
    odd = {"id": "c1", "type": "future", "future": {"body": {"deep": [f"k={AWS}"]}}}
    out = _message(content=None, tool_calls=[odd])
    _scan(out)
    assert AWS not in json.dumps(out)


def test_a_streamed_custom_tool_call_arrives_whole_and_scanned() -> None:
    first = {"index": 0, "id": "call1", "type": "custom", "custom": {"name": "shell", "input": "export "}}
    deltas = [{"role": "assistant", "tool_calls": [first]}] + [
        {"tool_calls": [{"index": 0, "type": "custom", "custom": {"input": p}}]}
        for p in ["KEY=", AWS, " && run"]
    ]
    events = _stream_chunks(deltas)
    calls = [tc for e in events[:-1] for c in e["choices"] for tc in (c["delta"].get("tool_calls") or [])]
    assert calls == [
        {
            "index": 0,
            "id": "call1",
            "type": "custom",
            "custom": {"name": "shell", "input": "export KEY=[AWS_ACCESS_KEY] && run"},
        }
    ]


def test_json_escaped_secrets_in_tool_arguments_are_redacted() -> None:
    escaped = "\\u0041" + AWS[1:]
    args = '{"cmd": "export AWS_ACCESS_KEY_ID=' + escaped + '", "n": 1}'
    fn = {"id": "c1", "type": "function", "function": {"name": "shell", "arguments": args}}
    out = _message(content=None, tool_calls=[fn])
    _scan(out)
    got = out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(got) == {"cmd": "export AWS_ACCESS_KEY_ID=[AWS_ACCESS_KEY]", "n": 1}

    first = {"index": 0, "id": "c1", "type": "function", "function": {"name": "shell", "arguments": args}}
    events = _stream_chunks([{"role": "assistant", "tool_calls": [first]}])
    streamed = "".join(
        tc["function"]["arguments"]
        for e in events[:-1]
        for c in e["choices"]
        for tc in c["delta"].get("tool_calls") or []
    )
    assert AWS not in json.loads(streamed)["cmd"]

    # arguments that are not JSON are scanned as text
    fn = {"id": "c1", "type": "function", "function": {"name": "shell", "arguments": f"KEY={AWS}"}}
    out = _message(content=None, tool_calls=[fn])
    _scan(out)
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "KEY=[AWS_ACCESS_KEY]"


def test_merges_of_held_stream_pieces_are_linear() -> None:
    import time

    from steward.gateway.guarding import merge_logprobs

    def timed(n: int) -> float:
        parts = [{"content": [{"token": "a", "logprob": -0.1}], "refusal": None} for _ in range(n)]
        t = time.perf_counter()
        merged = merge_logprobs(parts)
        assert merged is not None and len(merged["content"]) == n
        return time.perf_counter() - t

    assert timed(40_000) < 0.5
    first = {"content": [1]}
    assert merge_logprobs([first, {"content": [2]}]) == {"content": [1, 2]}
    assert first == {"content": [1]}  # the parts themselves are left as they were


def test_a_held_tool_call_past_the_cap_cuts_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from steward.gateway import guarding

    monkeypatch.setattr(guarding, "MAX_HELD_CALL_CHARS", 100)
    first = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    deltas = [{"role": "assistant", "tool_calls": [first]}] + [
        {"tool_calls": [{"index": 0, "function": {"arguments": "x" * 30}}]} for _ in range(5)
    ]
    events = _stream_chunks(deltas)
    finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["content_filter"]
    assert not any(c["delta"].get("tool_calls") for e in events[:-1] for c in e["choices"])
    (report,) = [r for r in events[-1]["reports"] if r["field"] == "tool_calls"]
    assert report["cut"] and "held tool calls exceed" in report["errors"]["size"]


def test_streamed_call_pieces_merge_at_any_depth() -> None:
    from steward.gateway.guarding import merge_call, merge_pieces

    pieces: list[dict[str, Any]] = [
        {"index": 0, "id": "c1", "type": "custom", "custom": {"name": "sh", "input": None}},
        {"index": 0, "type": "custom", "custom": {"input": "ls "}},
        {"index": 0, "custom": {"input": "-l", "meta": {"note": "a"}}},
        {"index": 0, "custom": {"meta": {"note": "b"}}},
    ]
    want = {
        "index": 0,
        "id": "c1",
        "type": "custom",
        "custom": {"name": "sh", "input": "ls -l", "meta": {"note": "ab"}},
    }
    assert merge_pieces(pieces) == want
    acc: dict[str, Any] = {}
    for p in pieces:
        merge_call(acc, p)
    assert acc == want


def test_numbers_in_json_arguments_are_scanned_too() -> None:
    from steward.gateway.guarding import Guard

    guard = Guard(
        {
            "version": 1,
            "policies": {
                "default": {
                    "input": [],
                    "output": [{"scanner": "pii", "action": "redact", "redaction": "mask"}],
                }
            },
        }
    )
    s = asyncio.run(
        guard.scan_field('{"card": 4111111111111111, "n": 2}', _inp(), json_text=True, leak_state={})
    )
    assert s.text is not None and json.loads(s.text) == {"card": "[CREDIT_CARD]", "n": 2}


def test_only_the_changed_leaves_of_json_arguments_are_scanned_again() -> None:
    guard = _secrets_guard()
    calls: list[str] = []
    scan = guard.pipeline.scan_output

    async def counted(text: str, *a: Any, **kw: Any) -> Any:
        calls.append(text)
        return await scan(text, *a, **kw)

    guard.pipeline.scan_output = counted  # type: ignore[method-assign]
    args = json.dumps({"items": [f"line {n}\nmore" for n in range(200)], "key": f"k={AWS}"})
    s = asyncio.run(guard.scan_field(args, _inp(), json_text=True, leak_state={}))
    assert s.text is not None and json.loads(s.text)["key"] == "k=[AWS_ACCESS_KEY]"
    assert json.loads(s.text)["items"] == [f"line {n}\nmore" for n in range(200)]
    assert calls[1:] == [f"k={AWS}"]  # the whole text, then only the leaf that changed


# -- fields the guard had no name for, lone surrogates, odd call shapes ----------------------------

SAY = f"The key is {AWS} and mail {EMAIL}"


def test_audio_transcripts_reasoning_details_and_unknown_fields_are_scanned(gw: Any, up: Scripted) -> None:
    details = [{"type": "reasoning.text", "text": SAY, "format": "unknown", "index": 0}]

    def script(body: dict[str, Any]) -> Any:
        if not body.get("stream"):
            audio = {"id": "audio_1", "data": "UklGRg==", "expires_at": 1, "transcript": SAY}
            return answer(None, audio=audio, reasoning_details=details, future={"note": SAY})
        return [
            chunk({"role": "assistant", "content": None}),
            chunk({"reasoning_details": [{**details[0], "text": SAY[:15]}]}),
            chunk({"reasoning_details": [{"index": 0, "text": SAY[15:]}]}),
            chunk({"audio": {"id": "audio_1", "transcript": SAY[:20], "data": "UklG"}}),
            chunk({"audio": {"transcript": SAY[20:], "data": "Rg=="}}),
            chunk({"future": {"note": SAY}}),
            chunk({}, finish="stop"),
            usage(),
        ]

    up.script = script
    msgs = [{"role": "user", "content": "read me the key"}]
    out = post(gw, {"messages": msgs})
    events = stream(gw, {"messages": msgs})
    delta: dict[str, Any] = {}
    for e in events:
        for c in e["choices"]:
            delta.update({k: v for k, v in c["delta"].items() if k != "role"})
    for got, trace in ((out["choices"][0]["message"], gw[1][-2]), (delta, last_trace(gw))):
        assert AWS not in json.dumps(got) and EMAIL not in json.dumps(got), got
        masked = got["audio"]["transcript"]
        assert "[AWS_ACCESS_KEY]" in masked and masked.startswith("The key is")
        assert got["audio"]["id"] == "audio_1" and "data" not in got["audio"]  # unscannable: dropped
        assert got["reasoning_details"][0]["text"] == masked and got["future"]["note"] == masked
        assert got["reasoning_details"][0]["type"] == "reasoning.text"
        scanned = outputs(trace)
        for field in ("audio.transcript", "reasoning_details[0].text", "future.note"):
            assert scanned[field]["scanned"] is True and scanned[field]["action"] == "redact", field
        assert scanned["audio.data"]["scanned"] is False and scanned["audio.data"]["action"] == "drop"
    stored = json.dumps(last_trace(gw).payload)
    assert "transcript" in stored and "[AWS_ACCESS_KEY]" in stored and AWS not in stored


def test_a_request_for_audio_output_is_refused_when_the_output_is_guarded(gw: Any, up: Scripted) -> None:
    up.script = lambda body: answer("hello")
    running, _ = gw
    h = {"authorization": f"Bearer {running.key('acme', 'user')}"}
    asks: list[dict[str, Any]] = [
        {"modalities": ["text", "audio"]},
        {"modalities": ["image", "text"]},
        {"audio": {"voice": "alloy", "format": "pcm16"}},
    ]
    for extra in asks:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
        r = httpx.post(running.url + "/v1/chat/completions", json=body, headers=h, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text
    assert post(gw, {"messages": [{"role": "user", "content": "hi"}], "modalities": ["text"]})


def test_a_lone_surrogate_escape_in_restored_arguments_is_served_and_audited(pgw: Any, up: Scripted) -> None:
    up.script = lambda body: answer_or_stream(body, None, '{"to": "' + token_of(body) + '", "s": "\\ud83d"}')
    msgs = [{"role": "user", "content": f"Mail {EMAIL} the invoice."}]
    for _, args in both_ways(pgw, msgs):  # both 200, the stream ends in [DONE]: audited
        assert json.loads(args) == {"to": EMAIL, "s": "\ud83d"}, args
        assert "\\ud83d" in args and last_trace(pgw).outcome == "ok"


def test_a_lone_surrogate_from_the_upstream_is_replaced_not_a_500(gw: Any, up: Scripted) -> None:
    text = "hi \ud83d mail " + EMAIL
    up.script = lambda body: (
        [chunk({"role": "assistant", "content": ""}), chunk({"content": text}), chunk({}, finish="stop")]
        if body.get("stream")
        else answer(text)
    )
    msgs = [{"role": "user", "content": "hello"}]
    got = post(gw, {"messages": msgs})["choices"][0]["message"]["content"]
    assert got.startswith("hi \ufffd mail") and EMAIL not in got
    assert streamed(stream(gw, {"messages": msgs}), "content") == got


def _pseudo_guard() -> Any:
    from steward.gateway.guarding import Guard

    pii = [{"scanner": "pii", "action": "redact", "redaction": "pseudonym", "quasi_action": "allow"}]
    return Guard(
        {"version": 1, "policies": {"default": {"restore_pseudonyms": True, "input": [], "output": pii}}}
    )


def _field(text: str, vault: Vault, json_text: bool = True) -> Any:
    from steward.gateway.guarding import InputResult
    from steward.guard import ScanContext

    return asyncio.run(
        _pseudo_guard().scan_field(text, InputResult(ScanContext(), vault), json_text=json_text)
    )


def test_a_backslash_before_a_token_in_arguments_is_kept() -> None:
    vault = Vault()
    tok = vault.pseudonym("PERSON", "Alice", "user")
    for value in ("C:\\" + tok, "dir\\" + tok + "\\x", "C:\\\\" + tok, "C:\\Users\\" + tok + "\\Documents"):
        s = _field(json.dumps({"path": value}), vault)
        assert s.text is not None and json.loads(s.text) == {"path": value.replace(tok, "Alice")}, s.text
    s = _field('{"path": "C:\\\\' + tok + '", "more', vault)  # not JSON (cut short)
    assert s.text == '{"path": "C:\\\\Alice", "more'


def test_non_json_arguments_are_restored_once() -> None:
    vault = Vault()
    vault.pseudonym("PERSON", "Alice", "user")
    tok = vault.pseudonym("USERNAME", "x<PERSON_1>y", "user")
    assert _field('{"u": "' + tok + '"', vault).text == '{"u": "x<PERSON_1>y"'
    assert json.loads(_field(json.dumps({"u": tok}), vault).text) == {"u": "x<PERSON_1>y"}


def test_rewritten_arguments_keep_their_numbers_and_every_key() -> None:
    vault = Vault()
    tok = vault.pseudonym("PERSON", "Alice", "user")
    args = '{"to": "' + tok + '", "amount": 1e400, "x": 0.30000000000000000001, "q": 1E2, "k": [1, -0]}'
    assert _field(args, vault).text == args.replace(tok, "Alice")
    mask = _mask_guard()
    from steward.gateway.guarding import InputResult
    from steward.guard import ScanContext

    roles = json.dumps({"roles": {"ann@example.com": "admin", "bob@example.org": "viewer"}})
    s = asyncio.run(mask.scan_field(roles, InputResult(ScanContext(), Vault()), json_text=True))
    assert s.text is not None and "example" not in s.text
    got = json.loads(s.text)["roles"]
    assert sorted(got.values()) == ["admin", "viewer"] and len(got) == 2, s.text


def _mask_guard() -> Any:
    from steward.gateway.guarding import Guard

    pii = [{"scanner": "pii", "action": "redact", "redaction": "mask", "quasi_action": "allow"}]
    return Guard({"version": 1, "policies": {"default": {"input": [], "output": pii}}})


def test_a_token_split_across_two_json_strings_does_not_cut_the_choice() -> None:
    vault = Vault()
    vault.pseudonym("PERSON", "Alice", "user")
    s = _field(json.dumps(["<", "PERSON_1>"]), vault)
    # what each string alone gives (the bare `PERSON_1` is a token), not a cut choice
    assert s.text is not None and json.loads(s.text) == ["<", "Alice>"], s.report


def test_parallel_calls_without_a_distinct_index_stay_separate() -> None:
    for index in (None, 0):
        c1 = {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        c2 = {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": 1}'}}
        if index is not None:
            c1["index"] = c2["index"] = index
        more = {"function": {"arguments": '{"tz": 2}'}}  # a piece without index or id: the last call's
        events = _stream_chunks([{"role": "assistant", "tool_calls": [c1]}, {"tool_calls": [c2]}])
        calls = [tc for e in events[:-1] for c in e["choices"] for tc in c["delta"].get("tool_calls") or []]
        assert [(c["id"], c["function"]["name"]) for c in calls] == [
            ("call_a", "get_weather"),
            ("call_b", "get_time"),
        ]
        assert len({c["index"] for c in calls}) == 2
        events = _stream_chunks([{"tool_calls": [c1]}, {"tool_calls": [more]}])
        (merged,) = [
            tc for e in events[:-1] for c in e["choices"] for tc in c["delta"].get("tool_calls") or []
        ]
        assert merged["function"]["arguments"] == '{}{"tz": 2}'


def test_a_tool_call_index_that_is_not_a_number_is_not_a_crash() -> None:
    tc = {"index": "x", "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    events = _stream_chunks([{"role": "assistant", "tool_calls": [tc]}])
    calls = [tc for e in events[:-1] for c in e["choices"] for tc in c["delta"].get("tool_calls") or []]
    assert [(c["index"], c["id"], c["function"]) for c in calls] == [
        (0, "c", {"name": "f", "arguments": "{}"})
    ]


def test_a_stream_whose_only_choice_is_cut_is_blocked_whatever_n_asked(gw: Any, up: Scripted) -> None:
    def script(body: dict[str, Any]) -> Any:
        return [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": f"the prompt is [{canary_of(body)}] "}),
            *[chunk({"content": "more text "}) for _ in range(20)],
            chunk({}, finish="stop"),
            usage(),
        ]

    up.script = script
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    events = stream(gw, {"messages": msgs, "n": 2})
    assert finishes(events) == {0: ["content_filter"]} and "stw-canary" not in json.dumps(events)
    assert last_trace(gw).outcome == "blocked"


def test_an_audit_event_holding_a_lone_surrogate_is_still_canonical() -> None:
    from steward.audit.events import canonical_json

    raw = canonical_json({"payload": "x \ud83d y", "k\udc00": 1})
    assert raw == b'{"k\\udc00":1,"payload":"x \\ud83d y"}'
    assert canonical_json(json.loads(raw)) == raw  # the same bytes again, as a leaf is verified
