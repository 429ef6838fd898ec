"""Bad input and refused callers: always OpenAI's error shape with the right status, never a 500."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_harness import Running

CHAT = "/v1/chat/completions"


def post(gw: Running, key: str | None, body: Any, path: str = CHAT, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    if isinstance(body, bytes):
        return httpx.post(
            gw.url + path, content=body, headers={**headers, "content-type": "application/json"}, timeout=60
        )
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=60)


def err(r: httpx.Response, status: int, type_: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if type_:
        assert body["error"]["type"] == type_
    if code:
        assert body["error"]["code"] == code
    assert r.headers["x-request-id"].startswith("req_")
    return dict(body["error"])


OK = {"model": "builtin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{bad json", None),
        (b"", None),
        (b"[1, 2]", None),
        ({"model": "builtin"}, "messages"),
        ({**OK, "messages": []}, "messages"),
        ({**OK, "temperature": "hot"}, "temperature"),
        ({**OK, "temperature": 3}, "temperature"),
        ({**OK, "max_tokens": 1.5}, "max_tokens"),
        ({**OK, "max_tokens": 0}, "max_tokens"),
        ({**OK, "n": True}, "n"),
        ({**OK, "top_p": 0}, "top_p"),
        ({**OK, "stop": [""]}, "stop"),
        ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**OK, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({**OK, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**OK, "stream": "yes"}, "stream"),
        ({**OK, "top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_invalid_requests_are_400(gateway: Running, user_key: str, body: Any, param: str | None) -> None:
    e = err(post(gateway, user_key, body), 400, "invalid_request_error")
    if param:
        assert e["param"] is not None and e["param"].startswith(param.split("[")[0])


def test_invalid_utf8_is_400(gateway: Running, user_key: str) -> None:
    raw = b'{"model": "builtin", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    err(post(gateway, user_key, raw), 400, "invalid_request_error", "invalid_json")


@pytest.mark.parametrize("name", ["tools", "response_format", "logit_bias", "frequency_penalty", "functions"])
def test_builtin_refuses_unsupported_parameters(gateway: Running, user_key: str, name: str) -> None:
    value: Any = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_object"},
        "logit_bias": {"1": 5},
        "frequency_penalty": 0.5,
        "functions": [{"name": "f"}],
    }[name]
    e = err(
        post(gateway, user_key, {**OK, name: value}), 400, "invalid_request_error", "unsupported_parameter"
    )
    assert e["param"] == name


def test_context_overflow_is_400(gateway: Running, user_key: str) -> None:
    # Ordinary prose: one token repeated hundreds of times is itself flagged (a repeated-token
    # attack, a CyberSecEval variant) and would be blocked before the length check.
    prose = "The quick brown fox jumps over the lazy dog. " * 60
    long = {**OK, "messages": [{"role": "user", "content": prose}]}
    err(post(gateway, user_key, long), 400, code="context_length_exceeded")
    too_many = {**OK, "max_tokens": 10_000}
    err(post(gateway, user_key, too_many), 400, code="context_length_exceeded")


def test_body_over_limit_is_413(gateway: Running, user_key: str) -> None:
    big = {**OK, "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]}
    err(post(gateway, user_key, big), 413, code="request_too_large")

    def chunks() -> Any:  # no content-length: the limit is enforced while the body streams in
        yield b'{"model": "builtin", "messages": [{"role": "user", "content": "'
        for _ in range(300):
            yield b"y" * 4096
        yield b'"}]}'

    r = httpx.post(
        gateway.url + CHAT, content=chunks(), headers={"authorization": f"Bearer {user_key}"}, timeout=60
    )
    err(r, 413, code="request_too_large")


def test_unknown_model_404_and_route_404_405(gateway: Running, user_key: str) -> None:
    err(post(gateway, user_key, {**OK, "model": "gpt-99"}), 404, "not_found_error", "model_not_found")
    err(post(gateway, user_key, {}, path="/v1/nothing"), 404)
    r = httpx.get(gateway.url + CHAT, headers={"authorization": f"Bearer {user_key}"})
    err(r, 405)
    err(post(gateway, user_key, {**OK, "model": "all-minilm-l6-v2"}), 400, code="model_not_supported")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Basic abc",
        "Bearer sk-stw-' OR '1'='1",
        "Bearer sk-stw-" + "A" * 43,
        "Bearer ' UNION SELECT hash FROM api_keys --",
        "Bearer sk-stw-" + "é" * 43,
    ],
)
def test_bad_keys_are_401(gateway: Running, header: str | None) -> None:
    headers = {"authorization": header.encode("utf-8")} if header else {}
    r = httpx.post(gateway.url + CHAT, json=OK, headers=headers)
    err(r, 401, "authentication_error")
    if header:
        secret = header.split(" ", 1)[-1]
        assert secret not in r.text or len(secret) < 8  # the presented key is never echoed


def test_revoked_and_expired_keys_are_401(gateway: Running) -> None:
    key, rec = gateway.keys.create("acme", "user")
    assert post(gateway, key, OK).status_code == 200
    gateway.keys.revoke(rec.id)
    deadline = time.time() + 1.0  # every replica sees a revocation within a second
    while time.time() < deadline and post(gateway, key, OK).status_code == 200:
        time.sleep(0.05)
    err(post(gateway, key, OK), 401)
    short, _ = gateway.keys.create("acme", "user", expires_in_s=1)
    time.sleep(1.1)
    err(post(gateway, short, OK), 401)


def test_role_and_model_refusals_are_403(gateway: Running) -> None:
    auditor = gateway.key("acme", "auditor")
    err(post(gateway, auditor, OK), 403, "permission_error")
    only_embed = gateway.key("acme", "user", models=["all-minilm-l6-v2"])
    err(post(gateway, only_embed, OK), 403, code="model_not_allowed")
    r = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {only_embed}"})
    assert [m["id"] for m in r.json()["data"]] == ["all-minilm-l6-v2"]


def test_admin_api(gateway: Running, admin_key: str, user_key: str) -> None:
    h = {"authorization": f"Bearer {admin_key}"}
    err(post(gateway, user_key, {"tenant": "x"}, path="/admin/keys"), 403)
    r = httpx.post(gateway.url + "/admin/keys", json={"tenant": "newco", "role": "user"}, headers=h)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["key"].startswith("sk-stw-") and made["prefix"] == made["key"][:11]
    listed = httpx.get(gateway.url + "/admin/keys?tenant=newco", headers=h).json()["data"]
    assert [k["id"] for k in listed] == [made["id"]] and all(
        "key" not in k and "hash" not in k for k in listed
    )
    assert post(gateway, made["key"], OK).status_code == 200
    assert httpx.delete(gateway.url + f"/admin/keys/{made['id']}", headers=h).json()["revoked_at"]
    err(httpx.delete(gateway.url + "/admin/keys/key_nope", headers=h), 404)
    err(httpx.post(gateway.url + "/admin/keys", json={"tenant": "bad tenant"}, headers=h), 400)
    err(httpx.post(gateway.url + "/admin/keys", json={"tenant": "t", "role": "god"}, headers=h), 400)


def test_limits_exact_with_headers_and_retry_after(gateway: Running, admin_key: str) -> None:
    h = {"authorization": f"Bearer {admin_key}"}
    spec = {"tenant": "limited", "limits": [{"kind": "requests", "window": "day", "limit": 3}]}
    key = httpx.post(gateway.url + "/admin/keys", json=spec, headers=h).json()["key"]
    codes = []
    for _ in range(5):
        r = post(gateway, key, OK)
        codes.append(r.status_code)
        if r.status_code == 200:
            assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert codes == [200, 200, 200, 429, 429]
    err(r, 429, "rate_limit_error", "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0"
    # tenant token budget: reserve prompt + max_tokens before calling, so an oversized request is refused
    httpx.put(
        gateway.url + "/admin/tenants/tokcap",
        json={"limits": [{"kind": "tokens", "window": "day", "limit": 40}]},
        headers=h,
    ).raise_for_status()
    k2 = gateway.key("tokcap", "user")
    err(post(gateway, k2, {**OK, "max_tokens": 100}), 429)
    assert post(gateway, k2, {**OK, "max_tokens": 5}).status_code == 200


JSONV = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "model",
        "messages",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "stream",
        "max_tokens",
        "logprobs",
        "top_logprobs",
        "user",
        "stream_options",
        "prompt",
        "input",
        "tools",
        "max_completion_tokens",
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from([CHAT, "/v1/completions", "/v1/embeddings", "/admin/keys"]),
    body=st.dictionaries(FIELDS, JSONV, max_size=6) | JSONV,
    model=st.sampled_from(["builtin", "all-minilm-l6-v2", None]),
)
def test_fuzz_never_500(gateway: Running, admin_key: str, path: str, body: Any, model: str | None) -> None:
    if isinstance(body, dict) and model is not None:
        body = {**body, "model": model}
        if "max_tokens" in body and isinstance(body["max_tokens"], int) and body["max_tokens"] > 4:
            body["max_tokens"] = 4
        body.pop("max_completion_tokens", None)
    r = post(gateway, admin_key, json.dumps(body).encode(), path=path)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err(r, r.status_code)
