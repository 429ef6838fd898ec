"""Through a real gateway: budgets hold within one request (a cap goes upstream,
every prompt of a list is reserved), /v1/moderations is under the key's limits, malformed input is a
precise 400 and an unexpected exception a 500 in OpenAI's shape, and a long request keeps its
concurrency slot for as long as it runs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_harness import Running, ThreadedUpstream, auth, free_port, start_gateway
from steward.gateway.app import JsonFormatter
from steward.gateway.settings import ModelRoute, Settings

CHAT = "/v1/chat/completions"
WORDS = " ".join(f"w{i}" for i in range(1000))


@pytest.fixture(scope="module")
def up() -> Iterator[ThreadedUpstream]:
    u = ThreadedUpstream(reply_text=WORDS)
    yield u
    u.close()


@pytest.fixture(scope="module")
def ugw(up: ThreadedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    models = [
        ModelRoute(
            name="fake", backend="openai", base_url=up.up.url, upstream_model="fake-model", max_retries=0
        )
    ]
    settings = Settings(
        data_dir=Path(tmp_path_factory.mktemp("gwbudget")),
        port=free_port(),
        models=models,
        embedding_model="",
        guards=False,
    )
    yield from start_gateway(settings)


def _last_body(up: ThreadedUpstream, path: str) -> dict[str, Any]:
    seen = [s for s in up.up.seen if s.path.endswith(path)]
    assert seen and isinstance(seen[-1].body, dict)
    return seen[-1].body


def test_the_audit_record_names_no_policy_when_guards_are_off_and_names_the_upstream(ugw: Running) -> None:
    """With guards off no policy ran, so none is recorded (it said "default"); what the backend
    learnt (HTTP attempts here; the serving member of a fallback chain) reaches the record."""
    import json

    import sqlalchemy as sa

    key = ugw.key("acme", "user")
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(ugw.url + CHAT, json=body, headers=auth(key), timeout=30)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    with ugw.keys.engine.connect() as c:
        leaves = [bytes(x) for (x,) in c.execute(sa.text("select leaf from audit_events order by idx"))]
    meta = [json.loads(leaf.split(b"\n", 1)[0]) for leaf in leaves]
    (ev,) = [m for m in meta if m["request_id"] == rid]
    assert ev["policy_version"] is None
    assert ev["detail"]["upstream_attempts"] == 1


# --- (3a) an upstream call without max_tokens is capped at what was reserved -----------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "fake", "prompt": "hi"}),
    ],
)
@pytest.mark.parametrize("kind", ["tokens", "spend"])
def test_upstream_call_without_max_tokens_cannot_overrun_a_budget(
    ugw: Running, up: ThreadedUpstream, path: str, body: dict[str, Any], kind: str
) -> None:
    limit = 400 if kind == "tokens" else 1000.0
    key = ugw.key("budget", "user", limits=[{"kind": kind, "window": "day", "limit": limit}])
    r = httpx.post(ugw.url + path, json=body, headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text[:500]
    cap = ugw.settings.default_max_tokens
    assert _last_body(up, path)["max_tokens"] == cap  # the reservation went upstream as the cap
    usage = r.json()["usage"]
    assert usage["completion_tokens"] <= cap and usage["total_tokens"] <= 400
    # settled to the real usage: the counter holds exactly what was used
    if kind == "tokens":
        import sqlalchemy as sa

        # the gateway's database holds the limits (a persistent store: shared and kept on restart)
        with ugw.keys.engine.connect() as c:
            rows = c.execute(sa.text("select scope, kind, used from limit_counters")).all()
        mine = [used for scope, k, used in rows if scope.startswith("key:") and k == "tokens"]
        assert usage["total_tokens"] in mine


def test_upstream_call_keeps_the_clients_own_cap_and_unlimited_keys_pass_through(
    ugw: Running, up: ThreadedUpstream
) -> None:
    capped = ugw.key("budget2", "user", limits=[{"kind": "tokens", "window": "day", "limit": 400}])
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(
        ugw.url + CHAT,
        json={"model": "fake", "messages": msgs, "max_completion_tokens": 7},
        headers=auth(capped),
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
    sent = _last_body(up, CHAT)
    assert sent["max_completion_tokens"] == 7 and "max_tokens" not in sent
    free = ugw.key("nolimits", "user")
    r = httpx.post(ugw.url + CHAT, json={"model": "fake", "messages": msgs}, headers=auth(free), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1000
    assert "max_tokens" not in _last_body(up, CHAT)


# --- (3b) a list of prompts reserves every prompt, every choice ------------------------------------


def test_completion_with_many_prompts_reserves_all_of_them(gateway: Running) -> None:
    key = gateway.key("listprompt", "user", limits=[{"kind": "tokens", "window": "day", "limit": 300}])
    body = {"model": "builtin", "prompt": ["Once upon a time"] * 32, "max_tokens": 20, "seed": 1}
    r = httpx.post(gateway.url + "/v1/completions", json=body, headers=auth(key), timeout=120)
    assert r.status_code == 429, r.text[:500]  # 32 prompts × 20 tokens alone is 640 > 300
    assert r.json()["error"]["type"] == "rate_limit_error"
    # a list that fits: reserved = every prompt's tokens + max_tokens × n × prompts; settled to usage
    small = {
        "model": "builtin",
        "prompt": ["Once upon a time", "The end"],
        "max_tokens": 5,
        "n": 2,
        "seed": 1,
    }
    r1 = httpx.post(gateway.url + "/v1/completions", json=small, headers=auth(key), timeout=120)
    assert r1.status_code == 200, r1.text[:500]
    assert len(r1.json()["choices"]) == 4
    u1 = r1.json()["usage"]
    reserved1 = 300 - int(r1.headers["x-ratelimit-remaining-tokens"])
    assert reserved1 >= u1["prompt_tokens"] + 5 * 2 * 2
    assert u1["completion_tokens"] <= 5 * 2 * 2
    one = {"model": "builtin", "prompt": "Once upon a time", "max_tokens": 1, "seed": 1}
    r2 = httpx.post(gateway.url + "/v1/completions", json=one, headers=auth(key), timeout=120)
    u2 = r2.json()["usage"]
    assert int(r2.headers["x-ratelimit-remaining-tokens"]) == 300 - u1["total_tokens"] - (
        u2["prompt_tokens"] + 1
    )


def test_upstream_completion_reserves_prompts_times_best_of(ugw: Running) -> None:
    key = ugw.key("bestof", "user", limits=[{"kind": "tokens", "window": "day", "limit": 1000}])
    body = {"model": "fake", "prompt": ["ab", "cd", "ef"], "max_tokens": 10, "n": 2, "best_of": 4}
    r = httpx.post(ugw.url + "/v1/completions", json=body, headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text[:500]
    # the fake answers one choice; the reservation (visible in the header) covers 3 prompts × 4 × 10
    reserved = 1000 - int(r.headers["x-ratelimit-remaining-tokens"])
    assert reserved >= 3 * 4 * 10
    tight = ugw.key("bestof2", "user", limits=[{"kind": "tokens", "window": "day", "limit": 100}])
    r = httpx.post(ugw.url + "/v1/completions", json=body, headers=auth(tight), timeout=30)
    assert r.status_code == 429


# --- (8) malformed input is a precise 400; an unexpected exception a 500 in OpenAI's shape ---------


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        (
            CHAT,
            '{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":1' + "0" * 400 + "}",
            "max_tokens",
        ),
        (
            CHAT,
            '{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":1'
            + "0" * 40
            + "}",
            "max_completion_tokens",
        ),
        ("/v1/completions", '{"model":"fake","prompt":"hi","max_tokens":1' + "0" * 400 + "}", "max_tokens"),
        (
            CHAT,
            '{"model":"fake","messages":[{"role":"user","content":"hi"}],"seed":1' + "0" * 40 + "}",
            "seed",
        ),
        ("/v1/embeddings", '{"model":"fake","input":"hi","n":"abc"}', "n"),
        ("/v1/embeddings", '{"model":"fake","input":"hi","stream_options":"x"}', "stream_options"),
        ("/v1/embeddings", '{"model":"fake","input":"hi","stream":true}', "stream"),
        ("/v1/embeddings", '{"model":"fake","input":"hi","dimensions":1' + "0" * 40 + "}", "dimensions"),
    ],
)
def test_malformed_input_is_a_precise_400(ugw: Running, path: str, raw: str, param: str) -> None:
    key = ugw.key("fuzz", "user", limits=[{"kind": "tokens", "window": "day", "limit": 10_000}])
    r = httpx.post(
        ugw.url + path, content=raw, headers={**auth(key), "content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert r.headers.get("x-request-id")


class _Lines(logging.Handler):
    """The gateway's log lines as its JSON formatter writes them, plus uvicorn's records."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def loglines() -> Iterator[_Lines]:
    h = _Lines()
    loggers = [logging.getLogger("steward"), logging.getLogger("uvicorn")]
    for lg in loggers:
        lg.addHandler(h)
    yield h
    for lg in loggers:
        lg.removeHandler(h)


def test_an_unexpected_exception_is_a_500_in_openai_shape(
    ugw: Running, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, loglines: _Lines
) -> None:
    gw: Any = ugw.gateway
    backend = gw.models["fake"].backend
    secret = "patient-record-XYZ-123"

    async def boom(*_a: Any, **_k: Any) -> Any:
        raise ValueError(f"invalid literal: {secret!r}")

    def boom_stream(*_a: Any, **_k: Any) -> Any:
        raise ValueError(f"invalid literal: {secret!r}")

    monkeypatch.setattr(backend, "chat", boom)
    monkeypatch.setattr(backend, "chat_stream", boom_stream)
    key = ugw.key("boom", "user", limits=[{"kind": "concurrent", "limit": 1}])
    auditor = ugw.key("boom", "auditor")
    capfd.readouterr()
    body = {"model": "fake", "messages": [{"role": "user", "content": secret}]}
    rids = []
    for extra in ({}, {"stream": True}):
        r = httpx.post(ugw.url + CHAT, json={**body, **extra}, headers=auth(key), timeout=30)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "internal_error"
        assert secret not in r.text
        rid = r.headers.get("x-request-id")
        assert rid and rid in err["message"]
        rids.append(rid)
    # the concurrency slot came back each time (the second call was admitted under concurrent=1)
    monkeypatch.undo()
    ok = httpx.post(ugw.url + CHAT, json={**body, "max_tokens": 1}, headers=auth(key), timeout=30)
    assert ok.status_code == 200
    # a route outside the inference pipeline: the outermost catch answers in the same shape
    monkeypatch.setattr(gw, "principal", boom)
    r = httpx.get(ugw.url + "/v1/models", headers=auth(key), timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers.get("x-request-id") and r.headers["x-request-id"] in r.json()["error"]["message"]
    rids.append(r.headers["x-request-id"])
    monkeypatch.undo()
    time.sleep(0.2)
    captured = capfd.readouterr()
    text = captured.out + captured.err + "\n".join(loglines.lines)
    assert "Traceback" not in text and secret not in text
    logs = [json.loads(line) for line in loglines.lines]
    assert not [x for x in logs if x["logger"].startswith("uvicorn")]  # nothing for the server to print
    logged = {x.get("request_id") for x in logs if x["msg"] == "unhandled error"}
    assert set(rids) <= logged
    assert all(x.get("exc") == "ValueError" for x in logs if x["msg"] == "unhandled error")
    # the inference 500s are in the audit log
    events = httpx.get(ugw.url + "/audit/events?limit=1000", headers=auth(auditor), timeout=30).json()["data"]
    audited = {e["request_id"]: e for e in events}
    for rid in rids[:2]:
        assert audited[rid]["status"] == 500 and audited[rid]["outcome"] == "error"


def test_an_exception_mid_stream_ends_the_stream_with_an_error_event(
    ugw: Running, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, loglines: _Lines
) -> None:
    gw: Any = ugw.gateway
    backend = gw.models["fake"].backend
    real = backend.chat_stream

    async def breaks(call: Any) -> Any:
        n = 0
        async for chunk in real(call):
            yield chunk
            n += 1
            if n == 3:
                raise RuntimeError("boom in the middle")

    monkeypatch.setattr(backend, "chat_stream", breaks)
    key = ugw.key("midstream", "user", limits=[{"kind": "concurrent", "limit": 1}])
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    capfd.readouterr()
    with httpx.stream("POST", ugw.url + CHAT, json=body, headers=auth(key), timeout=30) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    last = json.loads(lines[-1][6:])
    assert last["error"]["type"] == "server_error" and "boom" not in lines[-1]
    monkeypatch.undo()
    ok = httpx.post(ugw.url + CHAT, json={**body, "stream": False, "max_tokens": 1}, headers=auth(key))
    assert ok.status_code == 200  # the slot was released
    time.sleep(0.2)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err
    logs = [json.loads(line) for line in loglines.lines]
    assert not [x for x in logs if x["logger"].startswith("uvicorn")]
    assert [x["exc"] for x in logs if x["msg"] == "unhandled error"] == ["RuntimeError"]


# --- (9) a long request keeps its concurrency slot ------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_long_request_keeps_its_concurrency_slot(ugw: Running, up: ThreadedUpstream, stream: bool) -> None:
    from steward.backends.fake_upstream import Fault

    gw: Any = ugw.gateway
    key = ugw.key("slow", "user", limits=[{"kind": "concurrent", "limit": 1}])
    old = gw.limiter._lease_ttl_s
    gw.limiter._lease_ttl_s = 0.6  # stands in for the 300 s default
    # non-streamed: the upstream is silent for 2 s; streamed (with max_tokens): 0.4 s between chunks
    if stream:
        up.up.add(Fault(kind="trickle", seconds=0.4))
    else:
        up.up.add(Fault(kind="delay", seconds=2.0))
    body: dict[str, Any] = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    if stream:
        body["stream"] = True

    def call(delay: float) -> int:
        time.sleep(delay)
        if stream and delay == 0:
            with httpx.stream("POST", ugw.url + CHAT, json=body, headers=auth(key), timeout=30) as r:
                for _ in r.iter_lines():
                    pass
                return r.status_code
        quick = {**body, "stream": False, "max_tokens": 1}
        return httpx.post(
            ugw.url + CHAT, json=quick if delay else body, headers=auth(key), timeout=30
        ).status_code

    try:
        with ThreadPoolExecutor(2) as ex:
            codes = list(ex.map(call, [0, 1.4]))
    finally:
        gw.limiter._lease_ttl_s = old
    assert codes == [200, 429]


# --- (4) /v1/moderations is under the key's limits ------------------------------------------------


@pytest.fixture(scope="module")
def mgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    settings = Settings(
        data_dir=Path(tmp_path_factory.mktemp("gwmod")), port=free_port(), models=[], embedding_model=""
    )
    yield from start_gateway(settings)


def _moderate(gw: Running, key: str, inp: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/moderations", json={"input": inp}, headers=auth(key), timeout=300)


def test_moderations_count_against_requests_and_tokens(mgw: Running) -> None:
    key = mgw.key("mod", "user", limits=[{"kind": "requests", "window": "day", "limit": 2}])
    first = _moderate(mgw, key, "hello there")
    assert first.status_code == 200, first.text[:500]
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert _moderate(mgw, key, "hello again").status_code == 200
    r = _moderate(mgw, key, "and again")
    assert r.status_code == 429, r.text[:500]
    assert r.json()["error"] == {
        "message": r.json()["error"]["message"],
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0"
    # tokens: the inputs' size is reserved before the scan (about one token per 3 bytes)
    tk = mgw.key("modtok", "user", limits=[{"kind": "tokens", "window": "day", "limit": 50}])
    r = _moderate(mgw, tk, ["some words to scan " * 10, "more"])
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    ok = _moderate(mgw, tk, "short text")
    assert ok.status_code == 200 and 0 < 50 - int(ok.headers["x-ratelimit-remaining-tokens"]) <= 10
    again = _moderate(mgw, tk, "short text")  # settled: the first one's tokens stay counted
    assert int(again.headers["x-ratelimit-remaining-tokens"]) < int(
        ok.headers["x-ratelimit-remaining-tokens"]
    )


def test_moderations_hold_a_concurrency_slot_while_scanning(mgw: Running) -> None:
    key = mgw.key("modconc", "user", limits=[{"kind": "concurrent", "limit": 1}])
    big = ["some long text to scan " * 40] * 64

    def call(delay: float) -> int:
        time.sleep(delay)
        return _moderate(mgw, key, big if delay == 0 else "short").status_code

    with ThreadPoolExecutor(2) as ex:
        codes = list(ex.map(call, [0, 0.5]))
    assert codes == [200, 429]
    assert _moderate(mgw, key, "short").status_code == 200  # released after the scan


def test_a_limiter_outage_mid_stream_is_a_503_event_and_a_client_gone_is_cancelled(
    ugw: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.requests import ClientDisconnect

    from steward.gateway.limits.base import LimiterUnavailable

    gw: Any = ugw.gateway
    backend = gw.models["fake"].backend
    real = backend.chat_stream

    async def outage(call: Any) -> Any:
        async for chunk in real(call):
            yield chunk
            raise LimiterUnavailable("redis went away")

    async def gone(*_a: Any, **_k: Any) -> Any:
        raise ClientDisconnect()

    monkeypatch.setattr(backend, "chat_stream", outage)
    monkeypatch.setattr(backend, "chat", gone)
    key = ugw.key("outage", "user")
    auditor = ugw.key("outage", "auditor")
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream(
        "POST", ugw.url + CHAT, json={**body, "stream": True}, headers=auth(key), timeout=30
    ) as r:
        rid_stream = r.headers["x-request-id"]
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    last = json.loads(lines[-1][6:])
    assert last["error"]["code"] == "limiter_unavailable" and last["error"]["type"] == "service_unavailable"
    r = httpx.post(ugw.url + CHAT, json=body, headers=auth(key), timeout=30)
    assert r.status_code == 499
    rid_gone = r.headers["x-request-id"]
    monkeypatch.undo()
    events = httpx.get(ugw.url + "/audit/events?limit=1000", headers=auth(auditor), timeout=30).json()["data"]
    audited = {e["request_id"]: e for e in events}
    assert audited[rid_stream]["status"] == 503 and audited[rid_stream]["outcome"] == "error"
    assert audited[rid_gone]["status"] == 499 and audited[rid_gone]["outcome"] == "cancelled"
