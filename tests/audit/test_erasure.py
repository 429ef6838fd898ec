"""Erasure destroys the key's bytes, not only the row's reference to them, and is on the record.

The review that found it (HIGH): after `steward audit erase` the wrapped data key was still in
SQLite's write-ahead log (and free space), so the KEK file plus `steward.db-wal` gave the erased
payload back.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from steward.audit.keyring import KeyRing, PayloadUnavailable
from steward.audit.log import OPERATOR_TENANT, AuditLog
from steward.audit.schema import DATA_KEYS

from .helpers import make_event


def _files(db: Path) -> bytes:
    """Every byte SQLite keeps for the database: main file, write-ahead log, shared-memory index."""
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")) if p.is_file())


def _leftovers(wrapped: bytes, blob: bytes) -> int:
    """8-byte pieces of the sealed key found in `blob`. Any piece matters: AES-GCM is a stream
    cipher, so with the KEK and the nonce even part of the ciphertext gives part of the data key."""
    sealed = wrapped[2 + wrapped[1] :]
    return sum(sealed[i : i + 8] in blob for i in range(len(sealed) - 7))


def _wrapped_keys(log: AuditLog, subject: str, tenant: str = "acme") -> list[bytes]:
    ref = log.keys.subject_ref(tenant, subject)
    with log.engine.connect() as conn:
        rows = conn.execute(
            select(DATA_KEYS.c.wrapped).where(DATA_KEYS.c.subject_ref == ref, DATA_KEYS.c.tenant == tenant)
        ).all()
    return [bytes(r[0]) for r in rows if r[0] is not None]


def _populate(log: AuditLog) -> None:
    # Enough subjects that data_keys spans several pages and rebalances while growing.
    log.append_many([make_event(i, subject=f"subject-{i}") for i in range(150)])
    log.append(make_event(1000, subject="alice"))
    log.append_many([make_event(i, subject=f"subject-{i}") for i in range(150, 300)])


def test_erased_key_leaves_the_sqlite_files(sqlite_engine: Engine, keys_dir: Path, tmp_path: Path) -> None:
    """The reproduction: raw bytes of steward.db + steward.db-wal must not hold the wrapped key."""
    log = AuditLog.open(sqlite_engine, keys_dir, checkpoint_every=10_000, checkpoint_interval_s=3600)
    _populate(log)
    db = tmp_path / "steward.db"
    (wrapped,) = _wrapped_keys(log, "alice")
    assert wrapped in _files(db)  # as the reviewer found it: the pool keeps the WAL alive
    erasure = log.erase("alice", "acme", role="cli", detail={"os_user": "tester"})
    assert erasure.count == 1 and erasure.scrub.complete, erasure.scrub.message
    assert wrapped not in _files(db) and _leftovers(wrapped, _files(db)) == 0
    assert not (tmp_path / "steward.db-wal").exists() or (tmp_path / "steward.db-wal").stat().st_size == 0
    # traffic goes on: later commits never bring the old page image back
    log.append_many([make_event(i, subject=f"subject-{i}") for i in range(300, 340)])
    assert _leftovers(wrapped, _files(db)) == 0
    with pytest.raises(PayloadUnavailable, match="erased"):
        log.read_payload(150)
    assert log.read_payload(151) is not None


def test_a_busy_wal_is_reported_and_scrubbed_later(
    sqlite_engine: Engine, keys_dir: Path, tmp_path: Path
) -> None:
    log = AuditLog.open(sqlite_engine, keys_dir, checkpoint_every=10_000, scrub_wait_s=0.3)
    _populate(log)
    (wrapped,) = _wrapped_keys(log, "alice")
    reader = sqlite3.connect(tmp_path / "steward.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM audit_events").fetchone()  # holds a snapshot of the WAL
    try:
        erasure = log.erase("alice", "acme")
        assert erasure.count == 1 and not erasure.scrub.complete
        assert "write-ahead log" in erasure.scrub.message and "\n" not in erasure.scrub.message
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert wrapped in _files(tmp_path / "steward.db")  # the reader kept the old page image alive
    assert log.keys.scrub().complete
    assert _leftovers(wrapped, _files(tmp_path / "steward.db")) == 0


def test_erasure_is_recorded_under_each_tenant_by_pseudonym(log: AuditLog) -> None:
    """SQLite and PostgreSQL: one admin event per tenant that lost keys, naming the subject by the
    pseudonym its own events carry; scrubbing (WAL truncate / VACUUM) completes on an idle store."""
    a = log.append(make_event(0, subject="alice"))
    log.append(make_event(1, subject="alice", tenant="globex"))
    log.append(make_event(2, subject="bob"))
    size = log.size()
    erasure = log.erase("alice", role="cli", detail={"os_user": "tester"})
    assert erasure.destroyed == {"acme": 1, "globex": 1}
    assert erasure.scrub.complete, erasure.scrub.message
    recs = [log.get_event(r.index) for r in erasure.receipts]
    assert [r.index for r in recs] == [size, size + 1]
    assert {r.tenant for r in recs} == {"acme", "globex"}
    by_tenant = {r.tenant: r.meta for r in recs}
    acme = by_tenant["acme"]
    assert acme["kind"] == "admin" and acme["principal"]["role"] == "cli"
    assert acme["detail"] == {
        "action": "subject.erase",
        "os_user": "tester",
        "keys_destroyed": 1,
        "scope": "*",
    }
    assert acme["subject_ref"] == log.get_event(a.index).meta["subject_ref"]
    assert "alice" not in str(recs[0].meta) + str(recs[1].meta)
    # nothing found anywhere: still recorded, under the operator, without a subject
    nothing = log.erase("nobody")
    assert nothing.count == 0
    (rec,) = [log.get_event(r.index) for r in nothing.receipts]
    assert rec.tenant == OPERATOR_TENANT and rec.meta["subject_ref"] is None
    assert rec.meta["detail"]["keys_destroyed"] == 0


def test_cli_erase_prints_one_warning_when_the_wal_stays_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steward.commands import audit as audit_cmd
    from steward.store.db import make_engine
    from steward.store.migrate import upgrade

    from .test_export_cli import _app

    monkeypatch.setenv("STEWARD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("STEWARD_DATABASE_URL", raising=False)
    monkeypatch.setattr(KeyRing, "SCRUB_WAIT_S", 0.3)
    engine = upgrade(make_engine())
    log = AuditLog.open(engine, tmp_path / "data" / "keys")
    log.append_many([make_event(i, subject="dora") for i in range(3)])
    reader = sqlite3.connect(tmp_path / "data" / "steward.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM audit_events").fetchone()
    try:
        r = CliRunner().invoke(_app(), ["audit", "erase", "--subject", "dora"])
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "-wal" in warnings[0], r.output
    assert audit_cmd  # the command module under test
    r = CliRunner().invoke(_app(), ["audit", "erase", "--subject", "dora"])
    assert r.exit_code == 0 and "destroyed 0" in r.output and "warning" not in r.output
    engine.dispose()


def test_postgres_scrub_held_back_by_an_older_snapshot_is_reported_incomplete(
    fresh_pg_url: str, keys_dir: Path
) -> None:
    """PostgreSQL: a session holding a snapshot from before the erasure keeps VACUUM from removing
    the destroyed key's old row version; the scrub says so (and why) instead of claiming success,
    and a scrub after that session ends completes."""
    from sqlalchemy import text

    from steward.store.db import make_engine
    from steward.store.migrate import upgrade

    engine = upgrade(make_engine(fresh_pg_url))
    try:
        log = AuditLog.open(engine, keys_dir, checkpoint_every=10_000, checkpoint_interval_s=3600)
        log.append(make_event(0, subject="alice"))
        holder = engine.connect()  # a REPEATABLE READ report that started before the erasure
        holder.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        holder.execute(text("SELECT count(*) FROM audit_events")).scalar()
        try:
            erasure = log.erase("alice", "acme")
            assert erasure.count == 1
            assert not erasure.scrub.complete, erasure.scrub.message
            assert "snapshot" in erasure.scrub.message and "later scrub" in erasure.scrub.message
        finally:
            holder.rollback()
            holder.close()
        scrub = log.keys.scrub()
        assert scrub.complete, scrub.message
    finally:
        engine.dispose()
