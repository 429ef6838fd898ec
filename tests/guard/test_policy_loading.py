"""Policy files that must be refused at load time, with one message naming the file and the spot.

Review 1 (bad input): duplicate YAML keys (H1), wrong-typed thresholds and flags (H2), wrong-typed
scanner options (M3), and messages that did not name the file or read "invalid policy: : Value
error" (L2).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from steward.guard.policy import PolicyError, load_policy_set


def _write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# -- H1: duplicate keys ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        (
            "version: 1\npolicies:\n  default:\n    input:\n"
            "      - {scanner: pii, action: block, action: allow}\n",
            "action",
            5,
        ),
        (  # a repeated policy name: the second one would drop every scanner
            "version: 1\npolicies:\n  default:\n    input: [{scanner: pii}]\n  default:\n    input: []\n",
            "default",
            5,
        ),
        (
            "version: 1\npolicies:\n  default:\n    fail_closed: true\n    fail_closed: false\n",
            "fail_closed",
            5,
        ),
    ],
)
def test_duplicate_keys_are_refused_naming_key_and_line(
    tmp_path: Path, text: str, key: str, line: int
) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(PolicyError) as err:
        load_policy_set(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert f"duplicate key {key!r}" in msg and "\n" not in msg


def test_merge_keys_that_override_are_not_duplicates(tmp_path: Path) -> None:
    """`<<: *anchor` followed by an explicit key is YAML's way to override, not a repeat, even when
    the anchored mapping is itself built by merging (it is flattened before it is constructed)."""
    text = (
        "version: 1\n"
        "policies:\n"
        "  base:\n"
        "    input:\n"
        "      - &base {scanner: pii, action: block}\n"
        "      - &mid {<<: *base, action: redact}\n"
        "  default:\n"
        "    input:\n"
        "      - {<<: *mid, action: flag}\n"
    )
    pset = load_policy_set(_write(tmp_path, text))
    assert [s.action.value for s in pset.policies["base"].input] == ["block", "redact"]
    assert pset.policies["default"].input[0].action.value == "flag"
    ok = (
        "version: 1\n"
        "policies:\n"
        "  strict: &strict\n"
        "    input: [{scanner: pii, action: block}]\n"
        "  default:\n"
        "    <<: *strict\n"
        "    input: [{scanner: pii, action: redact}]\n"
    )
    pset = load_policy_set(_write(tmp_path, ok))
    assert pset.policies["default"].input[0].action.value == "redact"


# -- H2: numbers and flags must be real numbers and booleans ---------------------------------------
@pytest.mark.parametrize("value", ["true", '"0.5"', "false", "'1'"])
def test_threshold_must_be_a_number(tmp_path: Path, value: str) -> None:
    p = _write(
        tmp_path,
        f"version: 1\npolicies:\n  default:\n    input:\n      - {{scanner: pii, threshold: {value}}}\n",
    )
    with pytest.raises(
        PolicyError, match=r"policies\.default\.input\.0\.threshold: Input should be a valid number"
    ):
        load_policy_set(p)


def test_integer_threshold_is_a_number_and_hashes_like_its_float(tmp_path: Path) -> None:
    one = load_policy_set(
        {"version": 1, "policies": {"default": {"input": [{"scanner": "pii", "threshold": 1}]}}}
    )
    one_f = load_policy_set(
        {"version": 1, "policies": {"default": {"input": [{"scanner": "pii", "threshold": 1.0}]}}}
    )
    assert one.policies["default"].input[0].threshold == 1.0
    assert one.policies["default"].version() == one_f.policies["default"].version()


@pytest.mark.parametrize(
    ("where", "field", "value"),
    [
        ("policy", "fail_closed", '"no"'),
        ("policy", "restore_pseudonyms", "1"),
        ("policy", "documents", '"false"'),
        ("spec", "fail_closed", "0"),
        ("top", "version", "true"),
    ],
)
def test_flags_must_be_booleans(tmp_path: Path, where: str, field: str, value: str) -> None:
    if where == "policy":
        text = f"version: 1\npolicies:\n  default:\n    {field}: {value}\n"
    elif where == "spec":
        text = f"version: 1\npolicies:\n  default:\n    input:\n      - {{scanner: pii, {field}: {value}}}\n"
    else:
        text = f"{field}: {value}\npolicies:\n  default: {{}}\n"
    with pytest.raises(PolicyError, match=field):
        load_policy_set(_write(tmp_path, text))


def test_dumped_policy_loads_back_with_the_same_version() -> None:
    pset = load_policy_set()
    again = load_policy_set(json.loads(json.dumps(pset.model_dump(mode="json"))))
    assert again.policies["default"].version() == pset.policies["default"].version()


# -- M3: scanner options are type-checked at load -------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"scanner": "prompt_leak", "options": {"ngram": 2.5}}, "ngram"),
        ({"scanner": "prompt_leak", "options": {"max_gap": "2"}}, "max_gap"),
        ({"scanner": "prompt_leak", "options": {"min_shared": True}}, "min_shared"),
        ({"scanner": "pii", "options": {"include_quasi": "no"}}, "include_quasi"),
        ({"scanner": "pii", "options": {"entities": "EMAIL_ADDRESS"}}, "entities"),
        ({"scanner": "jailbreak", "options": {"passages": "yes"}}, "passages"),
    ],
)
def test_wrong_typed_options_are_refused_at_load(spec: dict[str, Any], needle: str) -> None:
    pol = {"version": 1, "policies": {"default": {"output": [spec]}}}
    with pytest.raises(PolicyError) as err:
        load_policy_set(pol)
    msg = str(err.value)
    assert f"policies.default.output[0]: bad options for {spec['scanner']}: {needle}" in msg, msg


def test_well_typed_options_load() -> None:
    pol = {
        "version": 1,
        "policies": {
            "default": {
                "output": [
                    {"scanner": "prompt_leak", "options": {"ngram": 4, "max_gap": 0}},
                    {"scanner": "pii", "options": {"entities": ["EMAIL_ADDRESS"], "include_quasi": False}},
                ]
            }
        },
    }
    pset = load_policy_set(pol)
    assert pset.policies["default"].output[0].options == {"ngram": 4, "max_gap": 0}


# -- L2: every message names the file -------------------------------------------------------------
def test_errors_name_the_file(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b'version: 1\npolicies:\n  default:\n    description: "caf\xe9"\n')
    with pytest.raises(PolicyError) as err:
        load_policy_set(latin1)
    assert str(err.value).startswith(f"{latin1}: cannot read: not UTF-8")

    typo = _write(tmp_path, "version: 1\npolicies:\n  default:\n    input:\n      - {scanner: piii}\n")
    with pytest.raises(PolicyError) as err:
        load_policy_set(typo)
    assert str(err.value).startswith(f"{typo}: policies.default.input[0]: unknown scanner 'piii'")

    binding = _write(
        tmp_path, "version: 1\npolicies:\n  default: {}\nbindings:\n  - {tenant: acme, policy: strct}\n"
    )
    with pytest.raises(PolicyError) as err:
        load_policy_set(binding)
    msg = str(err.value)
    assert msg == f"{binding}: invalid policy: binding acme/* names unknown policy 'strct'", msg


def test_scan_cli_refuses_a_duplicate_key_with_one_line(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "version: 1\npolicies:\n  default:\n    input:\n"
        "      - {scanner: pii, action: block, action: allow}\n",
    )
    r = subprocess.run(
        [sys.executable, "-m", "steward.cli", "scan", "--policy", str(p), "my email is alice@example.com"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"steward: error: {p}:5: duplicate key 'action'", r.stderr


@pytest.mark.parametrize(
    ("direction", "scanner", "needle"),
    [("input", "prompt_leak", "list it under output"), ("output", "context_probe", "list it under input")],
)
def test_a_scanner_on_the_side_it_cannot_read_is_refused(direction: str, scanner: str, needle: str) -> None:
    """prompt_leak under input (or context_probe under output) loaded, ran on every request and
    could never find anything: a check that looked configured and was not there."""
    pol = {"version": 1, "policies": {"default": {direction: [{"scanner": scanner}]}}}
    with pytest.raises(PolicyError) as err:
        load_policy_set(pol)
    assert f"policies.default.{direction}[0]: {scanner}" in str(err.value) and needle in str(err.value)


def test_a_nan_threshold_is_refused_as_not_a_number() -> None:
    pol = {"version": 1, "policies": {"default": {"input": [{"scanner": "pii", "threshold": float("nan")}]}}}
    with pytest.raises(PolicyError) as err:
        load_policy_set(pol)
    assert "finite number" in str(err.value), str(err.value)


# -- review of 2026-12-05 (input side, F6): a binding's route ---------------------------------------
@pytest.mark.parametrize("route", ["/v1/chat/completions", "chat-completions", "Chat"])
def test_a_binding_route_that_can_never_match_is_refused(route: str) -> None:
    """A route written as a URL path or misspelt would never match a request, and the tenant would
    silently get another policy: refused at load, naming the routes that exist."""
    data = {
        "version": 1,
        "policies": {"default": {"input": []}, "strict": {"input": [{"scanner": "pii"}]}},
        "bindings": [{"tenant": "pathco", "route": route, "policy": "strict"}],
    }
    with pytest.raises(PolicyError) as info:
        load_policy_set(data)
    message = str(info.value)
    assert "bindings.0.route" in message and "'chat'" in message and "'embeddings'" in message


@pytest.mark.parametrize("route", ["*", "chat", "completions", "embeddings", "moderations"])
def test_every_route_a_request_is_scanned_under_can_be_bound(route: str) -> None:
    data = {
        "version": 1,
        "policies": {"default": {"input": []}, "strict": {"input": [{"scanner": "pii"}]}},
        "bindings": [{"tenant": "t", "route": route, "policy": "strict"}],
    }
    assert load_policy_set(data).select("t", "chat" if route == "*" else route)[0] == "strict"
