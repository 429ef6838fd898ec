"""Appending, checkpoints, proofs, payload encryption, erasure and key lifecycle on a real store."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine

from steward.audit import merkle
from steward.audit.crypto import KeyFileError, LocalKeyProvider
from steward.audit.keyring import PayloadUnavailable
from steward.audit.log import KEK_FILE, OPERATOR_TENANT, AuditLog, GroupCommitter
from steward.audit.note import PUBLIC_NAME, load_verifier
from steward.audit.schema import DATA_KEYS, EVENTS
from steward.audit.verify import verify_store

from .helpers import SECRET_PROMPT, make_event


def test_only_the_two_audit_tables_say_audit_or_event(engine: Engine) -> None:
    names = set(inspect(engine).get_table_names())
    assert {"audit_events", "audit_checkpoints", "data_keys", "merkle_nodes", "merkle_state"} <= names
    flagged = {n for n in names if "audit" in n or "event" in n}
    assert flagged == {"audit_events", "audit_checkpoints"}


def test_append_read_and_payload_encrypted(log: AuditLog, engine: Engine, tmp_path: Path) -> None:
    receipts = log.append_many([make_event(i, subject="alice" if i % 2 else None) for i in range(25)])
    assert [r.index for r in receipts] == list(range(25))
    ev = log.get_event(receipts[3].event_id)
    assert ev.index == 3 and ev.tenant == "acme" and ev.meta["request_id"] == "req-3"
    assert ev.meta["findings"] == [{"action": "redact", "category": "pii", "score": 0.93, "stage": "input"}]
    assert log.read_payload(ev) == {"prompt": f"{SECRET_PROMPT} #3", "answer": "answer 3"}
    assert log.read_payload(4) is not None
    with engine.connect() as conn:
        for leaf, subject_ref in conn.execute(select(EVENTS.c.leaf, EVENTS.c.subject_ref)):
            assert SECRET_PROMPT.encode() not in bytes(leaf)
            assert b"alice" not in bytes(leaf) and subject_ref != "alice"
    if engine.dialect.name == "sqlite":
        db = Path(str(engine.url.database)).read_bytes()
        wal = Path(str(engine.url.database) + "-wal")
        blob = db + (wal.read_bytes() if wal.exists() else b"")
        assert b"Quackenbush" not in blob and b"alice" not in blob


def test_tenants_do_not_see_each_other(log: AuditLog) -> None:
    log.append_many([make_event(0, tenant="acme"), make_event(1, tenant="globex")])
    assert log.get_event(1, tenant="globex").tenant == "globex"
    with pytest.raises(LookupError):
        log.get_event(1, tenant="acme")
    with pytest.raises(LookupError):
        log.read_payload(0, tenant="globex")
    assert [e.index for e in log.list_events(tenant="globex")] == [1]


def test_ciphertext_bound_to_event_and_tenant(log: AuditLog) -> None:
    log.append_many([make_event(0), make_event(1)])
    a, b = log.get_event(0), log.get_event(1)
    swapped = type(a)(a.index, a.meta, b.ciphertext)  # b's ciphertext presented as a's
    with pytest.raises(ValueError, match="authenticate"):
        log.read_payload(swapped)


def test_checkpoints_every_n_and_on_close(log: AuditLog, keys_dir: Path) -> None:
    log.append_many([make_event(i) for i in range(7)])
    assert log.latest_checkpoint() is None
    log.append_many([make_event(i) for i in range(7, 12)])
    cp = log.latest_checkpoint()
    assert cp is not None and cp.size == 12
    log.append(make_event(12))
    log.close()
    cp = log.latest_checkpoint()
    assert cp is not None and cp.size == 13
    verifier = load_verifier(keys_dir / PUBLIC_NAME)
    parsed = verifier.verify(cp.note)
    assert parsed.size == 13 and parsed.root == cp.root and parsed.origin == log.origin
    lines = cp.note.split("\n")
    assert lines[1] == "13" and lines[3] == "" and lines[4].startswith("\u2014 " + parsed.origin + " ")
    assert stat.S_IMODE(os.stat(keys_dir / "checkpoint.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys_dir / KEK_FILE).st_mode) == 0o600
    with pytest.raises(RuntimeError, match="closed"):
        log.append(make_event(99))


def test_proofs_from_the_store_verify(log: AuditLog, keys_dir: Path) -> None:
    # 75 leaves: crosses the cached level (16) and leaves a ragged right edge.
    log.checkpoint_every = 10_000
    log.append_many([make_event(i, payload=False) for i in range(40)])
    cp1 = log.checkpoint()
    log.append_many([make_event(i, payload=False) for i in range(40, 75)])
    cp2 = log.checkpoint()
    assert cp1 and cp2 and (cp1.size, cp2.size) == (40, 75)
    verifier = load_verifier(keys_dir / PUBLIC_NAME)
    for index in (0, 1, 15, 16, 33, 63, 64, 74):
        p = log.inclusion_proof(index)
        signed = verifier.verify(p.checkpoint)
        merkle.verify_inclusion(index, signed.size, p.leaf_hash, p.proof, signed.root)
        assert p.leaf_hash == merkle.leaf_hash(bytes(_leaf(log, index)))
    p = log.inclusion_proof(5, tree_size=40)
    merkle.verify_inclusion(5, 40, p.leaf_hash, p.proof, cp1.root)
    with pytest.raises(merkle.ProofError):
        log.inclusion_proof(40, tree_size=40)
    merkle.verify_consistency(40, 75, log.consistency_proof(40, 75), cp1.root, cp2.root)
    for s1 in (1, 16, 17, 32, 50):
        merkle.verify_consistency(s1, 75, log.consistency_proof(s1, 75), _root(log, s1), cp2.root)


def _leaf(log: AuditLog, index: int) -> bytes:
    with log.engine.connect() as conn:
        return bytes(conn.execute(select(EVENTS.c.leaf).where(EVENTS.c.idx == index)).scalar_one())


def _root(log: AuditLog, size: int) -> bytes:
    return merkle.root(size, merkle.LeafList([merkle.leaf_hash(_leaf(log, i)) for i in range(size)]))


def test_erasure_shreds_payloads_and_verify_still_passes(log: AuditLog, keys_dir: Path) -> None:
    events = [make_event(i, subject="alice" if i % 3 == 0 else "bob") for i in range(12)]
    log.append_many(events)
    log.append(make_event(12, tenant="globex", subject="alice"))
    log.checkpoint()
    assert log.erase_subject("alice", tenant="acme") >= 1
    for i in range(12):
        if i % 3 == 0:
            with pytest.raises(PayloadUnavailable, match="erased"):
                log.read_payload(i)
        else:
            assert log.read_payload(i) is not None
    assert log.read_payload(12) is not None  # other tenant untouched when --tenant given
    assert log.erase_subject("alice") >= 1  # all tenants
    with pytest.raises(PayloadUnavailable):
        log.read_payload(12)
    # a new event for the erased subject gets a fresh key and is readable
    r = log.append(make_event(13, subject="alice"))
    assert log.read_payload(r.index) is not None
    log.checkpoint()
    report = verify_store(log.engine, load_verifier(keys_dir / PUBLIC_NAME))
    assert report.ok, report.problems


def test_rotation_and_retention(log: AuditLog, keys_dir: Path) -> None:
    r0 = log.append(make_event(0))
    k0 = log.get_event(r0.index).data_key
    assert log.rotate_data_keys() == 1
    rot = log.get_event(r0.index + 1)  # the rotation is on the record, filed under the operator
    assert rot.tenant == OPERATOR_TENANT and rot.meta["kind"] == "admin"
    assert rot.meta["detail"] == {"action": "key.rotate", "keys_retired": 1}
    r1 = log.append(make_event(1))
    k1 = log.get_event(r1.index).data_key
    assert k0 != k1
    assert log.read_payload(r0.index) and log.read_payload(r1.index)
    # KEK rotation: re-wrap every data key under the new KEK; history untouched and readable.
    provider = log.keys.provider
    assert isinstance(provider, LocalKeyProvider)
    new_kek = provider.rotate()
    assert log.rewrap_data_keys() >= 2
    with log.engine.connect() as conn:
        assert {r[0] for r in conn.execute(select(DATA_KEYS.c.kek_id))} == {new_kek}
    assert log.get_event(log.size() - 1).meta["detail"]["action"] == "kek.rewrap"
    assert stat.S_IMODE(os.stat(keys_dir / KEK_FILE).st_mode) == 0o600
    fresh = AuditLog.open(log.engine, keys_dir)
    assert fresh.read_payload(r0.index) == log.read_payload(r0.index)
    # retention: nothing is old enough yet (and nothing recorded); with a negative horizon
    # everything expires, and each tenant that lost keys gets an event
    size = log.size()
    assert log.expire_payloads(30 * 86400) == 0
    assert log.size() == size
    assert log.expire_payloads(-1e9) == 2
    expired = log.get_event(size)
    assert expired.tenant == "acme" and expired.meta["detail"]["action"] == "payload.expire"
    assert expired.meta["detail"]["keys_destroyed"] == 2
    with pytest.raises(PayloadUnavailable, match="expired"):
        log.read_payload(r1.index)


def test_group_commit_threads_and_asyncio(log: AuditLog) -> None:
    committer = GroupCommitter(log, max_batch=64, max_wait_s=0.005)
    futures = []

    def worker(base: int) -> None:
        for i in range(25):
            futures.append(committer.submit(make_event(base + i, payload=False)))

    threads = [threading.Thread(target=worker, args=(100 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    receipts = [f.result(timeout=30) for f in futures]

    async def many() -> list[int]:
        rs = await asyncio.gather(*(committer.append(make_event(1000 + i)) for i in range(30)))
        return [r.index for r in rs]

    indexes = asyncio.run(many())
    committer.close()
    all_idx = sorted([r.index for r in receipts] + indexes)
    assert all_idx == list(range(130))
    assert log.size() == 130
    # each receipt's event is durably stored with the receipt's leaf hash
    with log.engine.connect() as conn:
        stored = dict(conn.execute(select(EVENTS.c.idx, EVENTS.c.leaf_hash)).all())
    assert all(bytes(stored[r.index]) == r.leaf_hash for r in receipts)


def test_group_commit_reports_failures_to_every_caller(log: AuditLog) -> None:
    committer = GroupCommitter(log, max_wait_s=0.001)
    bad = make_event(0)
    object.__setattr__(bad, "detail", {"x": float("nan")})  # not canonical JSON
    futures = [committer.submit(make_event(1)), committer.submit(bad), committer.submit(make_event(2))]
    with pytest.raises(ValueError, match="canonical JSON"):
        futures[1].result(timeout=10)
    # the good events batched with it are committed all the same
    assert sorted(f.result(timeout=10).index for f in (futures[0], futures[2])) == [0, 1]
    assert committer.submit(make_event(3)).result(timeout=10).index == 2
    committer.close()


def test_group_commit_keeps_events_of_callers_that_stopped_waiting(log: AuditLog) -> None:
    committer = GroupCommitter(log, max_wait_s=0.0)
    bad = make_event(7)
    object.__setattr__(bad, "detail", {"x": float("nan")})

    async def scenario() -> tuple[int, str]:
        task = asyncio.ensure_future(committer.append(make_event(1)))
        await asyncio.sleep(0)  # queued
        task.cancel()  # the request went away (a dropped client, a shutdown)
        with pytest.raises(asyncio.CancelledError):
            await task
        # an async caller hears about its own event's failure, and later events still commit
        with pytest.raises(ValueError, match="canonical JSON") as err:
            await committer.append(bad)
        return (await committer.append(make_event(2))).index, str(err.value)

    index, _ = asyncio.run(scenario())
    committer.close()
    assert log.size() == 2 and index == 1
    assert log.get_event(0).meta["request_id"] == "req-1"  # the abandoned caller's event is there


def test_missing_or_bad_key_file_refuses_to_start(log: AuditLog, keys_dir: Path) -> None:
    log.append(make_event(0))
    kek = keys_dir / KEK_FILE
    data = kek.read_bytes()
    kek.unlink()
    with pytest.raises(KeyFileError, match="missing"):
        AuditLog.open(log.engine, keys_dir)
    kek.write_bytes(data)
    kek.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        AuditLog.open(log.engine, keys_dir)
    kek.chmod(0o600)
    kek.write_text("{not json")
    with pytest.raises(KeyFileError, match="malformed"):
        AuditLog.open(log.engine, keys_dir)
    kek.write_bytes(data)
    (keys_dir / "checkpoint.key").write_text("garbage")
    with pytest.raises(RuntimeError, match="not a usable PEM key"):
        AuditLog.open(log.engine, keys_dir)


def test_an_event_filed_under_another_tenant(log: AuditLog, keys_dir: Path, tmp_path: Path) -> None:
    """An admin act on another tenant is filed under it (its auditors list and prove it), names its
    actor in the principal, and verifies like any leaf; other leaves keep their exact old form."""
    from datetime import UTC, datetime, timedelta

    from steward.audit.events import AuditEvent, Principal
    from steward.audit.export import export_events, verify_export

    plain = log.append(make_event(0))
    act = AuditEvent(
        kind="admin",
        principal=Principal(tenant="ops", key_id="key_1", role="admin"),
        outcome="ok",
        detail={"action": "tenant.update", "target_tenant": "globex"},
        filed_under="globex",
    )
    r = log.append(act)
    ev = log.get_event(r.index, tenant="globex")
    assert ev.tenant == "globex" and ev.meta["tenant"] == "globex" and ev.meta["principal"]["tenant"] == "ops"
    assert "tenant" not in log.get_event(plain.index).meta
    assert [e.index for e in log.list_events(tenant="globex")] == [r.index]
    assert [e.index for e in log.list_events(tenant="ops")] == []
    log.checkpoint()
    verifier = load_verifier(keys_dir / PUBLIC_NAME)
    report = verify_store(log.engine, verifier)
    assert report.ok, report.problems
    out = tmp_path / "x.jsonl"
    with out.open("w") as f:
        export_events(log, f, datetime.now(UTC) - timedelta(days=1))
    assert verify_export(out, verifier).events == 2


def test_a_failed_checkpoint_after_the_commit_does_not_fail_committed_events(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint signed right after a commit fails (the store went away just then): every
    caller still gets its receipt, nothing is appended twice, and the periodic checkpoint signs the
    tail later."""
    from sqlalchemy.exc import OperationalError

    real = log.checkpoint
    calls = {"n": 0}

    def flaky() -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("SELECT ... FOR UPDATE", {}, Exception("server closed the connection"))
        return real()

    monkeypatch.setattr(log, "checkpoint", flaky)
    log.checkpoint_every = 3
    committer = GroupCommitter(log, max_wait_s=0.2)
    events = [make_event(i) for i in range(3)]

    async def scenario() -> list[object]:
        return list(await asyncio.gather(*(committer.append(e) for e in events), return_exceptions=True))

    outs = asyncio.run(scenario())
    committer.close()
    assert [getattr(o, "event_id", o) for o in outs] == [e.event_id for e in events]
    assert sorted(getattr(o, "index", -1) for o in outs) == [0, 1, 2]
    assert log.size() == 3 and calls["n"] == 1
    assert log.latest_checkpoint() is None  # unsigned so far, and still pending
    log.checkpoint_interval_s = 0
    cp = log.maybe_checkpoint()
    assert cp is not None and cp.size == 3


def test_a_retried_append_of_a_committed_event_is_a_success(log: AuditLog) -> None:
    """An append retried after its commit succeeded (unique violation on event_id) returns the
    stored event's receipt; a different event under a stored event id still fails."""
    from dataclasses import replace

    events = [make_event(0), make_event(1)]
    first = log.append_many(events)
    assert log.append_many(events) == first  # the whole batch again
    assert log.append(events[1]) == first[1]  # one of them again (GroupCommitter's one-by-one retry)
    assert log.size() == 2
    impostor = replace(events[0], status=500)
    with pytest.raises(Exception, match=r"(?i)unique"):
        log.append(impostor)
    assert log.size() == 2
