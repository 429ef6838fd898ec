"""`steward serve` and `steward keys` as a user runs them: real processes, real ports."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway_harness import env_for, serving, steward


def test_keys_cli_creates_the_store_and_prints_the_key_once(tmp_path: Path) -> None:
    env = env_for(tmp_path / "fresh")
    r = steward("keys", "create", "--tenant", "acme", "--role", "admin", env=env)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert re.fullmatch(r"sk-stw-[A-Za-z0-9_-]{43,}", key)
    assert (tmp_path / "fresh" / "steward.db").is_file()
    listed = steward("keys", "list", env=env)
    assert listed.returncode == 0 and key not in listed.stdout and key[:11] in listed.stdout
    db = (tmp_path / "fresh" / "steward.db").read_bytes()
    assert key.encode() not in db  # only the hash is stored
    key_id = re.search(r'"id": "(key_[0-9a-f]+)"', listed.stdout).group(1)  # type: ignore[union-attr]
    assert steward("keys", "revoke", key_id, env=env).returncode == 0
    assert '"revoked_at": null' not in steward("keys", "list", env=env).stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["keys", "create", "--tenant", "a b"], "invalid tenant"),
        (["keys", "create", "--tenant", "t", "--role", "root"], "invalid role"),
        (["keys", "revoke", "key_missing"], "no key"),
    ],
)
def test_keys_cli_errors_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    r = steward(*args, env=env_for(tmp_path))
    assert r.returncode != 0 and r.stdout == ""
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("port: eighty\n", "port"),
        ("models:\n  - name: x\n    backend: openai\n", "base_url"),
        ("nonsense_key: 1\n", "nonsense_key"),
        ("models: [\n", "cannot read config"),
    ],
)
def test_bad_config_stops_serve_with_one_line(tmp_path: Path, config: str, needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config)
    r = steward("serve", "--config", str(cfg), env=env_for(tmp_path))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


BODY = {"model": "builtin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _fire(urls: list[str], key: str, n: int) -> list[int]:
    def one(i: int) -> int:
        r = httpx.post(
            urls[i % len(urls)] + "/v1/chat/completions",
            json=BODY,
            headers={"authorization": f"Bearer {key}"},
            timeout=60,
        )
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def _limited_key(env: dict[str, str], limit: int) -> str:
    from steward.gateway.keys import KeyStore
    from steward.store import upgrade

    url = env.get("STEWARD_DATABASE_URL") or f"sqlite:///{Path(env['STEWARD_DATA_DIR']) / 'steward.db'}"
    store = KeyStore(upgrade(url))
    key, _ = store.create("acme", "user", limits=[{"kind": "requests", "window": "day", "limit": limit}])
    store.engine.dispose()
    return key


@pytest.mark.slow
def test_two_workers_without_redis_share_exact_limits(tmp_path: Path) -> None:
    env = env_for(tmp_path, STEWARD_EMBEDDING_MODEL="")
    key = _limited_key(env, 5)
    with serving(env, "--workers", "2") as url:
        codes = _fire([url], key, 14)
    assert codes.count(200) == 5 and codes.count(429) == 9


@pytest.mark.slow
def test_two_gateways_on_one_redis_admit_exactly_n(tmp_path: Path, redis_url: str) -> None:
    env = env_for(tmp_path, STEWARD_EMBEDDING_MODEL="", STEWARD_REDIS_URL=redis_url)
    key = _limited_key(env, 6)
    with serving(env) as a, serving(env) as b:
        codes = _fire([a, b], key, 16)
    assert codes.count(200) == 6 and codes.count(429) == 10


@pytest.mark.slow
def test_logs_are_json_without_keys_or_prompts(tmp_path: Path) -> None:
    env = env_for(tmp_path, STEWARD_EMBEDDING_MODEL="")
    key = _limited_key(env, 100)
    log = tmp_path / "serve.log"
    secret_prompt = "my password is hunter2-PLEASE-NOT-IN-LOGS"
    with serving(env, log=log) as url:
        h = {"authorization": f"Bearer {key}"}
        body = {"model": "builtin", "messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=60).status_code == 200
        httpx.post(
            url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer " + key[:-2] + "xx"}
        )
        httpx.post(url + "/v1/chat/completions", content=b"{oops", headers=h)
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    reqs = [r for r in records if r.get("msg") == "request"]
    assert [r["status"] for r in reqs] == [200, 401, 400]
    assert reqs[0]["key_prefix"] == key[:11] and reqs[0]["tenant"] == "acme"
    text = log.read_text()
    assert secret_prompt not in text and "hunter2" not in text
    assert key not in text and key[:-2] not in text


@pytest.mark.slow
def test_unreadable_audit_key_stops_serve_with_a_clear_line(tmp_path: Path) -> None:
    env = env_for(tmp_path, STEWARD_EMBEDDING_MODEL="", STEWARD_GUARDS="false")
    assert steward("keys", "create", "--tenant", "acme", env=env).returncode == 0  # creates the keys
    kek = next(p for p in (tmp_path / "keys").iterdir() if "kek" in p.name or p.name.endswith(".key"))
    kek.write_bytes(b"garbage")
    r = steward("serve", "--port", "1", env=env)
    assert r.returncode != 0
    assert "startup failed" in r.stderr and "Traceback" not in r.stderr
