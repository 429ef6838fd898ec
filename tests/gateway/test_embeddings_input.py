"""/v1/embeddings refuses what it cannot embed as it is, with a 400 that names the real parameter
and the real problem (review 30, findings 2, 3 and 5), as OpenAI's API does."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway_harness import Running, auth

MODEL = "all-minilm-l6-v2"


def _post(gw: Running, key: str, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + route, json=body, headers=auth(key), timeout=120)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ([], "got an empty list"),
        (["a"] * 2049, "got 2049 items; at most 2048"),
        ([1, 2, 3], "token-id input is not supported"),
        ([[1, 2], [3]], "token-id input is not supported"),
        ({}, "got an object"),
        (5, "got an integer"),
        (None, "got null"),
        (["a", 5], "got an integer at input[1]"),
    ],
)
def test_a_bad_input_names_the_parameter_and_the_problem(
    gateway: Running, user_key: str, value: object, needle: str
) -> None:
    """`input` is a union (a string, or a list of strings): the answer used to report the string
    branch's failure, under a parameter `input.str` that does not exist."""
    r = _post(gateway, user_key, "/v1/embeddings", {"model": MODEL, "input": value})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "input", r.text
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_value"
    assert err["message"].startswith("invalid value for input: must be a string or a list of strings")
    assert needle in err["message"], err["message"]


def test_token_id_prompts_of_completions_are_named_too(gateway: Running, user_key: str) -> None:
    r = _post(gateway, user_key, "/v1/completions", {"model": "builtin", "prompt": [1, 2], "max_tokens": 1})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt", r.text
    assert "token-id input is not supported" in err["message"]


@pytest.mark.parametrize(("value", "param"), [("", "input"), (["a", ""], "input[1]")])
def test_an_empty_string_is_refused(gateway: Running, user_key: str, value: object, param: str) -> None:
    """OpenAI refuses an empty input; its vector would be the encoder's [CLS][SEP] alone."""
    r = _post(gateway, user_key, "/v1/embeddings", {"model": MODEL, "input": value})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "input" and err["code"] == "invalid_value", r.text
    assert param in err["message"]


def test_an_input_over_the_window_is_refused_not_cut(gateway: Running, user_key: str) -> None:
    """Cut to the window, two texts that differ only after it got the same vector and a 200."""
    backend: Any = gateway.gateway.models[MODEL].backend  # type: ignore[attr-defined]
    window = backend.encoder.max_seq_length
    long = "steward " * (window + 50)
    n = len(backend.encoder.tokenizer.inner.encode(long, add_special_tokens=False).ids) + 2
    r = _post(gateway, user_key, "/v1/embeddings", {"model": MODEL, "input": ["short", long]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
    assert err["param"] == "input" and err["type"] == "invalid_request_error"
    assert f"input[1] has {n} tokens" in err["message"] and f"at most {window}" in err["message"]
    # Exactly the window still fits: [CLS] + window-2 tokens + [SEP].
    words = " ".join(["steward"] * (window - 2))
    assert len(backend.encoder.tokenizer.inner.encode(words, add_special_tokens=False).ids) == window - 2
    r = _post(gateway, user_key, "/v1/embeddings", {"model": MODEL, "input": words})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == window, r.text


def test_wrong_dimensions_is_the_clients_error(gateway: Running, user_key: str) -> None:
    r = _post(gateway, user_key, "/v1/embeddings", {"model": MODEL, "input": "hi", "dimensions": 100})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "dimensions", r.text
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_value")
    r = _post(gateway, user_key, "/v1/embeddings", {"model": MODEL, "input": "hi", "dimensions": 384})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384


def test_a_union_of_constrained_branches_reads_the_same() -> None:
    """Should `input` require non-empty strings in the schema (`constrained-str` tags), the
    message and `param` stay the same."""
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

    from steward.gateway.errors import validation_message

    text = Annotated[StrictStr, Field(min_length=1)]

    class Req(BaseModel):
        model_config = ConfigDict(strict=True)
        input: text | Annotated[list[text], Field(min_length=1, max_length=2048)]

    cases = {
        "[]": "must be a string or a list of strings (got an empty list)",
        "[1]": "token-id input is not supported",
        '["a", ""]': "input[1]: String should have at least 1 character",
    }
    for raw, needle in cases.items():
        with pytest.raises(ValidationError) as exc:
            Req.model_validate_json('{"input": ' + raw + "}")
        msg, param = validation_message(exc.value.errors())
        assert param == "input" and needle in msg, (raw, msg)
