"""Every request and admin act in the audit log, through the running gateway."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from gateway_harness import STEWARD, Running, audit_gateway, auth, env_for, serving
from steward.audit.merkle import ProofError, verify_inclusion

CHAT = "/v1/chat/completions"
SECRET_PROMPT = "the launch code is ORANGE-7731, keep it private"


@pytest.fixture(scope="module")
def agw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    yield from audit_gateway(Path(tmp_path_factory.mktemp("audit")))


def test_every_outcome_is_an_event_and_payloads_are_encrypted(agw: Running) -> None:
    user = agw.key("acme", "user", limits=[{"kind": "requests", "window": "day", "limit": 1}])
    admin = agw.key("acme", "admin")
    auditor = agw.key("acme", "auditor")
    body = {
        "model": "builtin",
        "messages": [{"role": "user", "content": SECRET_PROMPT}],
        "max_tokens": 3,
        "user": "subject-42",
    }
    ok = httpx.post(agw.url + CHAT, json=body, headers=auth(user), timeout=60)
    assert ok.status_code == 200
    bad = httpx.post(agw.url + CHAT, json={**body, "temperature": "x"}, headers=auth(user))
    limited = httpx.post(agw.url + CHAT, json=body, headers=auth(user))
    unauth = httpx.post(agw.url + CHAT, json=body, headers=auth("sk-stw-" + "Z" * 43))
    made = httpx.post(agw.url + "/admin/keys", json={"tenant": "acme"}, headers=auth(admin))
    assert (bad.status_code, limited.status_code, unauth.status_code, made.status_code) == (
        400,
        429,
        401,
        201,
    )

    events = httpx.get(agw.url + "/audit/events?limit=1000", headers=auth(auditor)).json()["data"]
    by_req = {e["request_id"]: e for e in events}
    e_ok = by_req[ok.headers["x-request-id"]]
    assert e_ok["kind"] == "inference" and e_ok["outcome"] == "ok" and e_ok["status"] == 200
    assert e_ok["model"]["id"] == "builtin" and len(e_ok["model"]["weights_hash"]) == 64
    assert e_ok["principal"]["key_id"].startswith("key_") and e_ok["usage"]["completion_tokens"] > 0
    assert e_ok["payload"] is not None and e_ok["subject_ref"] and "subject-42" not in str(e_ok)
    assert by_req[bad.headers["x-request-id"]]["status"] == 400
    assert by_req[limited.headers["x-request-id"]]["kind"] == "refusal"
    assert any(e["detail"].get("action") == "key.create" for e in events)
    # 401s name no tenant: they are visible to nobody's tenant view but are in the log
    with agw.keys.engine.connect() as c:
        n401 = c.execute(sa.text("select count(*) from audit_events where status = 401")).scalar()
    assert n401 and n401 >= 1

    db = (agw.settings.data_dir / "steward.db").read_bytes()
    wal = agw.settings.data_dir / "steward.db-wal"
    blob = db + (wal.read_bytes() if wal.exists() else b"")
    assert SECRET_PROMPT.encode() not in blob and b"ORANGE-7731" not in blob and b"subject-42" not in blob

    # reading the payload needs an auditor, and is itself an event
    eid = e_ok["id"]
    assert httpx.get(agw.url + f"/audit/events/{eid}/payload", headers=auth(admin)).status_code == 403
    assert httpx.get(agw.url + "/audit/events", headers=auth(user)).status_code == 403
    r = httpx.get(agw.url + f"/audit/events/{eid}/payload", headers=auth(auditor))
    assert r.status_code == 200
    assert r.json()["payload"]["request"]["messages"][0]["content"] == SECRET_PROMPT
    after = httpx.get(agw.url + "/audit/events?limit=1000", headers=auth(auditor)).json()["data"]
    reads = [e for e in after if e["kind"] == "access" and e["detail"].get("target") == eid]
    assert reads and reads[-1]["principal"]["role"] == "auditor"

    # no tenant sees another's
    other = agw.key("globex", "auditor")
    theirs = httpx.get(agw.url + "/audit/events?limit=1000", headers=auth(other)).json()["data"]
    assert all(e["principal"]["tenant"] == "globex" for e in theirs)
    assert httpx.get(agw.url + f"/audit/events/{eid}/payload", headers=auth(other)).status_code == 404


def test_inclusion_proof_verifies_against_the_signed_checkpoint(agw: Running) -> None:
    auditor = agw.key("acme", "auditor")
    user = agw.key("acme", "user")
    r = httpx.post(
        agw.url + CHAT,
        json={"model": "builtin", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        headers=auth(user),
        timeout=60,
    )
    rid = r.headers["x-request-id"]
    ev = next(
        e
        for e in httpx.get(agw.url + "/audit/events?limit=1000", headers=auth(auditor)).json()["data"]
        if e["request_id"] == rid
    )
    deadline = time.time() + 10
    while True:
        cp = httpx.get(agw.url + "/audit/checkpoint", headers=auth(auditor))
        if cp.status_code == 200 and cp.json()["tree_size"] > ev["index"]:
            break
        assert time.time() < deadline, "no checkpoint covering the event"
        time.sleep(0.2)
    size = cp.json()["tree_size"]
    p = httpx.get(
        agw.url + f"/audit/proof/inclusion?event_id={ev['id']}&tree_size={size}", headers=auth(auditor)
    )
    assert p.status_code == 200, p.text
    pj = p.json()
    root = base64.b64decode(cp.json()["root_hash"])
    verify_inclusion(
        pj["index"], size, base64.b64decode(pj["leaf_hash"]), [base64.b64decode(h) for h in pj["proof"]], root
    )
    with pytest.raises(ProofError):
        verify_inclusion(pj["index"], size, b"\x00" * 32, [base64.b64decode(h) for h in pj["proof"]], root)
    c = httpx.get(agw.url + f"/audit/proof/consistency?first=1&second={size}", headers=auth(auditor))
    assert c.status_code == 200 and isinstance(c.json()["proof"], list)


def _verify(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STEWARD, "audit", "verify", *extra], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_kill_9_loses_no_answered_request(tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    db = f"sqlite:///{tmp_path / 'steward.db'}"
    if store == "postgresql":
        db = str(request.getfixturevalue("fresh_pg_url"))
    env = env_for(tmp_path, STEWARD_EMBEDDING_MODEL="", STEWARD_DATABASE_URL=db)
    key = subprocess.run(
        [*STEWARD, "keys", "create", "--tenant", "acme"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    body = {"model": "builtin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answered: list[str] = []
    with serving(env) as url:
        stop = time.time() + 4

        def worker(_: int) -> None:
            with httpx.Client(timeout=30) as c:
                while time.time() < stop:
                    try:
                        r = c.post(url + CHAT, json=body, headers=auth(key))
                    except httpx.TransportError:
                        return
                    if r.status_code == 200:
                        answered.append(r.headers["x-request-id"])

        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(worker, i) for i in range(4)]
            time.sleep(2.5)
            # kill -9 the server while requests are in flight
            port = url.rsplit(":", 1)[1]
            out = subprocess.run(
                ["pgrep", "-f", "--", f"serve --port {port}"], capture_output=True, text=True
            )
            pids = [int(p) for p in out.stdout.split()]
            assert pids, "server process not found"
            for p in pids:
                os.kill(p, signal.SIGKILL)
            for f in futs:
                f.result()
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/healthz", timeout=2)  # it really is dead
    assert len(answered) >= 3
    from steward.audit import AuditLog
    from steward.store import make_engine

    engine = make_engine(db)
    log = AuditLog.open(engine, tmp_path / "keys")
    ids = set()
    after = -1
    while page := log.list_events(after=after, limit=1000):
        ids |= {e.meta["request_id"] for e in page}
        after = page[-1].index
    engine.dispose()
    missing = [r for r in answered if r not in ids]
    assert not missing, f"{len(missing)} answered requests have no event"
    v = _verify(env, "--allow-unsigned-tail")
    assert v.returncode == 0, v.stdout + v.stderr


@pytest.mark.slow
def test_two_workers_never_fork_the_log(tmp_path: Path) -> None:
    env = env_for(tmp_path, STEWARD_EMBEDDING_MODEL="")
    key = subprocess.run(
        [*STEWARD, "keys", "create", "--tenant", "acme"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    body = {"model": "builtin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with serving(env, "--workers", "2") as url:

        def one(_: int) -> int:
            return httpx.post(url + CHAT, json=body, headers=auth(key), timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(40)))
    assert codes.count(200) == 40
    v = _verify(env)  # the workers signed final checkpoints on SIGTERM: no unsigned tail
    assert v.returncode == 0, v.stdout + v.stderr
    with __import__("sqlite3").connect(tmp_path / "steward.db") as c:
        idx = [r[0] for r in c.execute("select idx from audit_events order by idx")]
    assert idx == list(range(len(idx))) and len(idx) >= 41
