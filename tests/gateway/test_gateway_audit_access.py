"""The audit log through the running gateway: every read of the log and every
refusal is on the record (bounded, never a raw path of an unauthenticated request); admin acts on
another tenant are filed under it too; erasure while the gateway serves leaves no key in the files.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gateway_harness import Running, audit_gateway, auth, env_for, steward
from steward.audit.merkle import verify_inclusion
from steward.gateway.audit_sink import UNAUTHENTICATED, event_from_trace, events_from_trace
from steward.gateway.trace import Trace

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def agw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    yield from audit_gateway(Path(tmp_path_factory.mktemp("audit-access")))


def _leaves(agw: Running) -> dict[str, list[dict[str, Any]]]:
    """Every event's metadata by request id, read from the store (what no tenant view filters)."""
    out: dict[str, list[dict[str, Any]]] = {}
    with agw.keys.engine.connect() as c:
        for (leaf,) in c.execute(sa.text("select leaf from audit_events order by idx")):
            meta = json.loads(bytes(leaf).split(b"\n", 1)[0])
            out.setdefault(meta["request_id"], []).append(meta)
    return out


def _stored(agw: Running) -> bytes:
    data = agw.settings.data_dir
    return b"".join(f.read_bytes() for f in data.iterdir() if f.name.startswith("steward.db"))


def test_every_read_of_the_log_and_every_refusal_is_an_access_event(agw: Running) -> None:
    auditor = agw.key("acme", "auditor")
    user = agw.key("acme", "user")
    deadline = time.time() + 10
    while httpx.get(agw.url + "/audit/checkpoint", headers=auth(auditor)).status_code != 200:
        assert time.time() < deadline, "no checkpoint"
        time.sleep(0.2)
    calls = {
        "events": ("/audit/events?limit=5&after=0", auditor, 200, "GET /audit/events"),
        "checkpoint": ("/audit/checkpoint", auditor, 200, "GET /audit/checkpoint"),
        "consistency": (
            "/audit/proof/consistency?first=1&second=1",
            auditor,
            200,
            "GET /audit/proof/consistency",
        ),
        "inclusion": (
            f"/audit/proof/inclusion?event_id={'q' * 500}",
            auditor,
            404,
            "GET /audit/proof/inclusion",
        ),
        "user": ("/audit/events", user, 403, "GET /audit/events"),
        "nokey": ("/audit/events?limit=" + "9" * 300, None, 401, "GET /audit/events"),
    }
    rids = {}
    for name, (path, key, status, _route) in calls.items():
        r = httpx.get(agw.url + path, headers=auth(key) if key else {})
        assert r.status_code == status, (name, r.text)
        rids[name] = r.headers["x-request-id"]
    leaves = _leaves(agw)
    for name, (_path, key, status, route) in calls.items():
        (ev,) = leaves[rids[name]]
        assert ev["kind"] == "access" and ev["status"] == status and ev["route"] == route, ev
        tenant = UNAUTHENTICATED if key is None else "acme"
        assert ev["principal"]["tenant"] == tenant
    assert leaves[rids["events"]][0]["detail"]["query"] == {"after": "0", "limit": "5"}
    assert leaves[rids["consistency"]][0]["detail"]["query"] == {"first": "1", "second": "1"}
    assert leaves[rids["inclusion"]][0]["detail"]["query"] == {"event_id": "q" * 64}  # bounded
    assert leaves[rids["user"]][0]["outcome"] == "refused"
    assert "query" not in leaves[rids["nokey"]][0]["detail"]  # nothing request-chosen without a key
    # the auditor sees its own reads in its tenant's listing
    mine = httpx.get(agw.url + "/audit/events?limit=1000", headers=auth(auditor)).json()["data"]
    assert {rids["events"], rids["checkpoint"], rids["user"]} <= {e["request_id"] for e in mine}


def test_a_path_parameter_of_an_unauthenticated_request_is_never_recorded(agw: Running) -> None:
    marker = "Jane-Doe-SSN-078-05-1120-"
    long_id = marker + "x" * 8000
    rids = []
    for _ in range(3):
        r = httpx.get(agw.url + f"/audit/events/{long_id}/payload")
        assert r.status_code == 401
        rids.append(r.headers["x-request-id"])
    user = agw.key("acme", "user")
    r = httpx.get(agw.url + f"/audit/events/{long_id}/payload", headers=auth(user))
    assert r.status_code == 403
    rids.append(r.headers["x-request-id"])
    leaves = _leaves(agw)
    for rid in rids:
        (ev,) = leaves[rid]
        assert ev["route"] == "GET /audit/events/{event_id}/payload" and ev["kind"] == "access"
    assert "target" not in leaves[rids[0]][0]["detail"]
    assert leaves[rids[-1]][0]["detail"]["target"] == f"(malformed, {len(long_id)} chars)"
    assert b"078-05-1120" not in _stored(agw)
    metrics = httpx.get(agw.url + "/metrics", headers=auth(agw.key("acme", "admin"))).text
    assert "078-05-1120" not in metrics


def test_admin_acts_on_another_tenant_are_filed_under_it_too(agw: Running) -> None:
    ops = agw.key("ops", "admin")
    ops_auditor = agw.key("ops", "auditor")
    made = httpx.post(
        agw.url + "/admin/keys", headers=auth(ops), json={"tenant": "globex", "role": "auditor"}
    )
    assert made.status_code == 201
    globex_auditor = made.json()["key"]
    put = httpx.put(
        agw.url + "/admin/tenants/globex",
        headers=auth(ops),
        json={"limits": [{"kind": "tokens", "window": "day", "limit": 1000}]},
    )
    assert put.status_code == 200
    own = httpx.post(agw.url + "/admin/keys", headers=auth(ops), json={"tenant": "ops"})
    assert own.status_code == 201
    leaves = _leaves(agw)
    for r, action in ((made, "key.create"), (put, "tenant.update")):
        first, mirror = leaves[r.headers["x-request-id"]]
        assert first["principal"]["tenant"] == "ops" and "tenant" not in first
        assert first["detail"]["action"] == action and first["detail"]["target_tenant"] == "globex"
        assert mirror["tenant"] == "globex" and mirror["principal"] == first["principal"]
        assert mirror["detail"] == {**first["detail"], "mirror_of": first["id"]}
    assert len(leaves[own.headers["x-request-id"]]) == 1  # an act on one's own tenant: one event

    seen = httpx.get(agw.url + "/audit/events?limit=1000", headers=auth(globex_auditor)).json()["data"]
    acts = [e for e in seen if e["kind"] == "admin"]
    assert {e["detail"]["action"] for e in acts} >= {"key.create", "tenant.update"}
    assert all(e["principal"]["tenant"] == "ops" for e in acts)
    theirs = [
        e for e in httpx.get(agw.url + "/audit/events?limit=1000", headers=auth(ops_auditor)).json()["data"]
    ]
    assert any(e["detail"].get("target_tenant") == "globex" for e in theirs)

    # the target tenant's auditor can prove the act against the signed checkpoint
    ev = next(e for e in acts if e["detail"]["action"] == "tenant.update")
    deadline = time.time() + 10
    while True:
        cp = httpx.get(agw.url + "/audit/checkpoint", headers=auth(globex_auditor)).json()
        if cp["tree_size"] > ev["index"]:
            break
        assert time.time() < deadline
        time.sleep(0.2)
    p = httpx.get(
        agw.url + f"/audit/proof/inclusion?event_id={ev['id']}&tree_size={cp['tree_size']}",
        headers=auth(globex_auditor),
    )
    assert p.status_code == 200, p.text
    pj = p.json()
    verify_inclusion(
        pj["index"],
        cp["tree_size"],
        base64.b64decode(pj["leaf_hash"]),
        [base64.b64decode(h) for h in pj["proof"]],
        base64.b64decode(cp["root_hash"]),
    )


def test_events_from_trace_only_trust_an_authenticated_well_formed_target() -> None:
    t = Trace(request_id="r1", route="PUT /admin/tenants/{tenant_id}")
    t.usage = {"admin_action": "tenant.update"}
    t.extra = {"target": "x" * 5000, "target_tenant": "globex", "query": {"a": "b"}}
    t.finish(401, "refused")
    (ev,) = events_from_trace(t)  # unauthenticated: nothing from the request, no copy
    assert ev.tenant == UNAUTHENTICATED and not {"target", "target_tenant", "query"} & set(ev.detail)
    t.key_id, t.tenant, t.role = "key_1", "ops", "admin"
    for bad in ("_unauthenticated", "a" * 65, "has space", ""):
        t.extra["target_tenant"] = bad
        (ev,) = events_from_trace(t)
        assert "target_tenant" not in ev.detail
    assert len(event_from_trace(t).detail["target"]) == 64
    t.extra["target_tenant"] = "globex"
    first, mirror = events_from_trace(t)
    assert (first.tenant, mirror.tenant, mirror.principal.tenant) == ("ops", "globex", "ops")


def test_cli_erase_while_the_gateway_serves_leaves_no_key_in_the_files(agw: Running) -> None:
    """Erase with the gateway running, traffic continuing, then scan the files."""
    user = agw.key("acme", "user")
    auditor = agw.key("acme", "auditor")
    body = {"model": "builtin", "messages": [{"role": "user", "content": "ZX-4471"}], "max_tokens": 1}
    r = httpx.post(agw.url + CHAT, headers=auth(user), json={**body, "user": "alice-p7"}, timeout=60)
    assert r.status_code == 200
    for _ in range(5):
        httpx.post(agw.url + CHAT, headers=auth(user), json=body, timeout=60)
    with agw.keys.engine.connect() as c:
        ref, key_id = c.execute(
            sa.text(
                "select subject_ref, json_extract(substr(leaf, 1, instr(leaf, x'0a') - 1), '$.payload.key') "
                "from audit_events where request_id = :rid"
            ),
            {"rid": r.headers["x-request-id"]},
        ).one()
        (wrapped,) = c.execute(sa.text("select wrapped from data_keys where id = :id"), {"id": key_id}).one()
    wrapped = bytes(wrapped)
    assert wrapped in _stored(agw)
    out = steward("audit", "erase", "--subject", "alice-p7", env=env_for(agw.settings.data_dir))
    assert out.returncode == 0 and "destroyed 1" in out.stdout, out.stdout + out.stderr
    assert "warning" not in out.stderr, out.stderr
    for _ in range(5):
        httpx.post(agw.url + CHAT, headers=auth(user), json=body, timeout=60)
    sealed = wrapped[2 + wrapped[1] :]
    blob = _stored(agw)
    assert not any(sealed[i : i + 8] in blob for i in range(len(sealed) - 7))
    # and the erasure is on the record of the tenant, under the subject's pseudonym
    seen = httpx.get(agw.url + "/audit/events?limit=1000", headers=auth(auditor)).json()["data"]
    erased = [e for e in seen if e["detail"].get("action") == "subject.erase"]
    assert erased and erased[-1]["subject_ref"] == ref and erased[-1]["principal"]["role"] == "cli"


def test_unauthenticated_refusals_past_the_minutes_quota_are_summarised(tmp_path: Path) -> None:
    """Anybody can send 401s without limit and the log is append-only: past the quota a minute's
    refusals are counted into one summary event, not appended one by one."""
    for gw in audit_gateway(tmp_path, audit_unauthenticated_per_minute=3):
        sink = gw.gateway.audit  # type: ignore[attr-defined]
        sink.sampler.window_s = 1.5
        sink.sampler.summary(time.monotonic())  # the window starts now
        before = sum(len(v) for v in _leaves(gw).values())
        for i in range(20):
            if i % 2:
                r = httpx.post(gw.url + "/v1/chat/completions", json={})
            else:
                r = httpx.get(gw.url + "/audit/events", headers={"authorization": "Bearer sk-stw-nope"})
            assert r.status_code == 401
        bad = gw.key("acme", "user")  # a 403 has a key: always recorded singly
        assert httpx.get(gw.url + "/audit/events", headers=auth(bad)).status_code == 403
        singles = sum(len(v) for v in _leaves(gw).values()) - before
        assert singles == 3 + 1
        deadline = time.time() + 10
        while True:
            events = [e for evs in _leaves(gw).values() for e in evs]
            summaries = [e for e in events if e["route"] == "(unauthenticated refusals, summarised)"]
            if summaries or time.time() > deadline:
                break
            time.sleep(0.2)
        assert len(summaries) == 1, "the window's summary was not written when it ended"
        detail = summaries[0]["detail"]
        assert detail["count"] == 17 and detail["summary"] is True
        assert sum(detail["by_route"].values()) == 17 and detail["by_status"] == {"401": 17}
        assert summaries[0]["principal"]["tenant"] == "_unauthenticated"
