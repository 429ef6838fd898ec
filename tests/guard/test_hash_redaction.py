"""Hash redaction is keyed by a secret of the deployment, not by a constant anyone can read.

With the public key b"steward" a hashed SSN (10^9 values) or phone number was recovered by hashing
every candidate; the tokens must also stay stable across requests and restarts of one deployment.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway_harness import Running, ThreadedUpstream, free_port, start_gateway
from steward.gateway.settings import ModelRoute, Settings
from steward.guard import Pipeline, ScanContext
from steward.guard.redact import HASH_KEY_FILE, load_hash_key

EMAIL = "jane.doe@example.org"
POLICY = {
    "version": 1,
    "policies": {"default": {"input": [{"scanner": "pii", "action": "redact", "redaction": "hash"}]}},
}


def _token(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:12]


def test_without_a_key_tokens_are_stable_in_the_process_and_not_the_public_constant() -> None:
    a = Pipeline(POLICY).scan_text(f"mail {EMAIL}", ScanContext(), "input").text
    b = Pipeline(POLICY).scan_text(f"write to {EMAIL}", ScanContext(), "input").text
    assert a is not None and b is not None
    token = a.split("<EMAIL_ADDRESS:")[1].split(">")[0]
    assert token in b
    assert token != _token(b"steward", EMAIL)


def test_the_deployment_key_is_created_once_private_and_reused(tmp_path: Path) -> None:
    key = load_hash_key(tmp_path / "keys")
    path = tmp_path / "keys" / HASH_KEY_FILE
    assert len(key) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_hash_key(tmp_path / "keys") == key
    text = Pipeline(POLICY, hash_key=key).scan_text(f"mail {EMAIL}", ScanContext(), "input").text
    assert text is not None and f"<EMAIL_ADDRESS:{_token(key, EMAIL)}>" in text
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        load_hash_key(tmp_path / "keys")


@pytest.fixture(scope="module")
def hgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path]]:
    up = ThreadedUpstream(reply_text="{echo}")
    data = Path(tmp_path_factory.mktemp("hash"))
    (data / "policies.yaml").write_text(yaml.safe_dump(POLICY))
    settings = Settings(
        data_dir=data,
        port=free_port(),
        models=[ModelRoute(name="echo", backend="openai", base_url=up.up.url, upstream_model="fake")],
        embedding_model="",
        guard_policies=data / "policies.yaml",
    )
    for running in start_gateway(settings):
        yield running, data
    up.close()


def test_the_gateway_hashes_with_its_own_secret_key(hgw: tuple[Running, Path]) -> None:
    gw, data = hgw
    key = gw.key("acme", "user")
    body = {"model": "echo", "messages": [{"role": "user", "content": f"mail {EMAIL} today"}]}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    seen = r.json()["choices"][0]["message"]["content"]  # the echo upstream repeats what it got
    secret = (data / "keys" / HASH_KEY_FILE).read_bytes()
    assert EMAIL not in seen and f"<EMAIL_ADDRESS:{_token(secret, EMAIL)}>" in seen, seen
    assert _token(b"steward", EMAIL) not in seen


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    load_hash_key(tmp_path / "keys")
    path = tmp_path / "keys" / HASH_KEY_FILE
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        load_hash_key(tmp_path / "keys")
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.startswith(".")]  # no temporary left
