"""Replicas sharing one store share one KEK and one checkpoint signer (review H1).

Before, every process whose keys directory was empty created its own KEK and signing key, even on a
store another replica already used: the second replica could not unwrap the first one's data keys
(its audited requests failed for good) and the checkpoint table held notes by two keys and origins,
so `verify` failed. The store now records the identity of both when they are first created, and a
process holding other keys refuses to start, naming what to copy.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine

from steward.audit.crypto import KeyFileError, LocalKeyProvider
from steward.audit.keyring import KeyRing
from steward.audit.log import IDENTITY_ROW, KEK_FILE, AuditLog
from steward.audit.note import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    SigningKeyError,
    load_or_create_signer,
    load_verifier,
)
from steward.audit.schema import STATE
from steward.audit.verify import verify_store

from .helpers import make_event


def _open(engine: Engine, keys: Path, origin: str | None = None) -> AuditLog:
    return AuditLog.open(engine, keys, origin=origin, checkpoint_every=10_000, checkpoint_interval_s=3600)


def test_a_second_replica_with_other_keys_refuses_to_start(engine: Engine, tmp_path: Path) -> None:
    a_keys, b_keys = tmp_path / "a" / "keys", tmp_path / "b" / "keys"
    a = _open(engine, a_keys)  # a brand-new store: keys are created and recorded
    # Replica B starts before any payload exists, with an empty keys directory: it creates nothing.
    with pytest.raises(KeyFileError, match=f"{KEK_FILE}.*missing.*copy {KEK_FILE} and {PRIVATE_NAME}"):
        _open(engine, b_keys)
    assert not (b_keys / KEK_FILE).exists() and not (b_keys / PRIVATE_NAME).exists()
    a.append(make_event(0))
    # Only the KEK copied: the signing key is not silently created either.
    b_keys.mkdir(parents=True, exist_ok=True)
    shutil.copy2(a_keys / KEK_FILE, b_keys / KEK_FILE)
    with pytest.raises(SigningKeyError, match=f"{PRIVATE_NAME} is missing.*signed by {a.origin}.*copy"):
        _open(engine, b_keys)
    assert not (b_keys / PRIVATE_NAME).exists()
    # Its own, different signing key: refused.
    other = tmp_path / "other"
    load_or_create_signer(other)
    shutil.copy2(other / PRIVATE_NAME, b_keys / PRIVATE_NAME)
    with pytest.raises(SigningKeyError, match="not the key this store's checkpoints are signed by"):
        _open(engine, b_keys)
    # A different origin: refused.
    shutil.copy2(a_keys / PRIVATE_NAME, b_keys / PRIVATE_NAME)
    with pytest.raises(SigningKeyError, match="origin"):
        _open(engine, b_keys, origin="somewhere/else")
    # The first replica's keys copied: B starts, reads A's payloads, writes its own; one log verifies.
    shutil.copy2(a_keys / PUBLIC_NAME, b_keys / PUBLIC_NAME)
    b = _open(engine, b_keys)
    assert b.origin == a.origin
    assert b.read_payload(0) == a.read_payload(0)
    b.append(make_event(1))
    assert a.read_payload(1) == b.read_payload(1)
    a.checkpoint()
    b.append(make_event(2))
    b.checkpoint()
    report = verify_store(engine, load_verifier(a_keys / PUBLIC_NAME))
    assert report.ok, report.problems


def test_a_different_kek_is_refused(engine: Engine, tmp_path: Path) -> None:
    a_keys, b_keys = tmp_path / "a" / "keys", tmp_path / "b" / "keys"
    a = _open(engine, a_keys)
    kek_id = LocalKeyProvider(a_keys / KEK_FILE).current_kek_id
    LocalKeyProvider(b_keys / KEK_FILE, create=True)  # B's own KEK file
    shutil.copy2(a_keys / PRIVATE_NAME, b_keys / PRIVATE_NAME)
    with pytest.raises(KeyFileError, match=f"wrapped by KEK '{kek_id}'.*merge the KEK files") as exc:
        _open(engine, b_keys)
    # B's own file may hold the KEK of data keys it wrapped before: never tell the operator to replace it.
    assert f"copy {KEK_FILE}" not in str(exc.value) and f"set \"current\" to '{kek_id}'" in str(exc.value)
    assert a.append(make_event(0)).index == 0


def test_replicas_starting_together_on_a_new_store_agree(engine: Engine, tmp_path: Path) -> None:
    """Several processes opening a brand-new store at once: exactly one identity is recorded; the
    others refuse (instead of each creating keys of their own)."""
    outcomes: dict[int, object] = {}
    barrier = threading.Barrier(4)

    def start(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = _open(engine, tmp_path / f"r{i}" / "keys").origin
        except (KeyFileError, SigningKeyError) as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    started = [o for o in outcomes.values() if isinstance(o, str)]
    assert len(outcomes) == 4 and len(started) == 1, outcomes
    with engine.connect() as conn:
        ident = json.loads(
            bytes(conn.execute(select(STATE.c.frontier).where(STATE.c.id == IDENTITY_ROW)).scalar_one())
        )
    assert ident["signer"].startswith(started[0] + "+")


def test_identity_is_recorded_for_a_store_from_before_and_follows_a_kek_rewrap(
    engine: Engine, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    log = _open(engine, keys)
    log.append(make_event(0))
    with engine.begin() as conn:  # a store written before identities were recorded
        conn.execute(delete(STATE).where(STATE.c.id == IDENTITY_ROW))
    stranger = tmp_path / "stranger"
    LocalKeyProvider(stranger / KEK_FILE, create=True)
    shutil.copy2(keys / PRIVATE_NAME, stranger / PRIVATE_NAME)
    with pytest.raises(KeyFileError, match=r"wrapped by KEK.*which .* does not hold.*merge"):
        _open(engine, stranger)  # its existing data keys tell the wrong KEK apart
    log = _open(engine, keys)  # the right keys: recorded now
    with engine.connect() as conn:
        assert conn.execute(select(STATE.c.id).where(STATE.c.id == IDENTITY_ROW)).scalar() == IDENTITY_ROW
    # KEK rotation, re-wrap, then the old KEK retired from the file: the store follows the new KEK.
    provider = log.keys.provider
    assert isinstance(provider, LocalKeyProvider)
    old = provider.current_kek_id
    new = provider.rotate()
    log.rewrap_data_keys()
    doc = json.loads((keys / KEK_FILE).read_text())
    doc["keys"].pop(old)
    (keys / KEK_FILE).write_text(json.dumps(doc))
    reopened = _open(engine, keys)
    assert reopened.keys.provider.current_kek_id == new
    assert reopened.read_payload(0) is not None


# -- read-only opens (review L1) --------------------------------------------------------------------


def _identity_rows(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(select(STATE.c.id).order_by(STATE.c.id))]


@contextlib.contextmanager
def _append_lock_held(engine: Engine) -> Iterator[None]:
    """Another writer holding the log's append lock (SQLite: the write lock; PostgreSQL: the
    sequencer row FOR UPDATE) for the duration."""
    if engine.dialect.name == "sqlite":
        raw = sqlite3.connect(str(engine.url.database), isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            raw.execute("ROLLBACK")
            raw.close()
        return
    with engine.connect() as conn:
        conn.execute(select(STATE.c.id).where(STATE.c.id == 1).with_for_update()).first()
        try:
            yield
        finally:
            conn.rollback()


def _open_read_only_while_locked(engine: Engine, keys: Path) -> AuditLog:
    # The pool outlives the lock: an open stuck on the lock is released (and joined) after it.
    with ThreadPoolExecutor(1) as pool, _append_lock_held(engine):
        fut = pool.submit(AuditLog.open, engine, keys, create_signing_key=False, read_only=True)
        try:
            return fut.result(timeout=10)
        except FuturesTimeout:
            pytest.fail("a read-only open waited for the append lock")


def test_a_read_only_open_takes_no_lock_and_records_nothing(engine: Engine, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    log = _open(engine, keys)
    log.append(make_event(0))
    log.checkpoint()
    with engine.begin() as conn:  # a store written before identities were recorded
        conn.execute(delete(STATE).where(STATE.c.id == IDENTITY_ROW))
    ro = _open_read_only_while_locked(engine, keys)
    assert _identity_rows(engine) == [1]  # nothing inserted
    assert ro.inclusion_proof(0).index == 0 and ro.consistency_proof(1, 1) == []
    assert ro.read_payload(0) is not None
    # No KEK file at all (an auditor with only the signing key): proofs work, nothing is created.
    auditor = tmp_path / "auditor"
    auditor.mkdir()
    shutil.copy2(keys / PRIVATE_NAME, auditor / PRIVATE_NAME)
    ro = _open_read_only_while_locked(engine, auditor)
    assert ro.inclusion_proof(0).index == 0
    assert not (auditor / KEK_FILE).exists() and _identity_rows(engine) == [1]
    with pytest.raises(KeyFileError, match="missing"):
        ro.read_payload(0)
    # Once the identity is recorded, read-only opens check the keys against it, still without the lock.
    _open(engine, keys)
    assert _identity_rows(engine) == [1, IDENTITY_ROW]
    assert _open_read_only_while_locked(engine, keys).inclusion_proof(0).index == 0
    stranger = tmp_path / "stranger"
    LocalKeyProvider(stranger / KEK_FILE, create=True)
    shutil.copy2(keys / PRIVATE_NAME, stranger / PRIVATE_NAME)
    with pytest.raises(KeyFileError, match=r"does not hold.*merge the KEK files"):
        _open_read_only_while_locked(engine, stranger)
    with pytest.raises(KeyFileError, match=r"missing.*copy"):
        _open_read_only_while_locked(engine, auditor)


def test_audit_proof_cli_does_not_write_to_a_store_from_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`steward audit proof` / `consistency` on a store that records no key identity leave it so."""
    import typer
    from typer.testing import CliRunner

    from steward.commands import audit as audit_cmd
    from steward.store.db import make_engine
    from steward.store.migrate import upgrade

    monkeypatch.setenv("STEWARD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("STEWARD_DATABASE_URL", raising=False)
    engine = upgrade(make_engine())
    log = _open(engine, tmp_path / "data" / "keys")
    log.append_many([make_event(i) for i in range(3)])
    log.checkpoint()
    with engine.begin() as conn:
        conn.execute(delete(STATE).where(STATE.c.id == IDENTITY_ROW))
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    audit_cmd.register(app)
    for args in (
        ["audit", "proof", "--index", "1"],
        ["audit", "consistency", "--first", "1", "--second", "3"],
    ):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, (r.output, r.exception)
        assert _identity_rows(engine) == [1], args
    engine.dispose()


# -- replicas that had split KEKs before identities were recorded ------------------------------------


def _merge_kek_file(into: Path, source: Path) -> None:
    """What the refusal tells the operator to do: add the other file's KEKs, keep this one's."""
    doc = json.loads(into.read_text())
    doc["keys"].update(
        {k: v for k, v in json.loads(source.read_text())["keys"].items() if k not in doc["keys"]}
    )
    into.write_text(json.dumps(doc))  # the file keeps its mode 0600


def test_an_upgrade_with_split_keks_asks_to_merge_and_checks_every_kek(
    engine: Engine, tmp_path: Path
) -> None:
    """Before identities, two replicas could each wrap data keys with their own KEK. Every live data
    key's KEK is checked (not just the newest key's), and the refusal names the missing KEK ids and
    says to merge the key files, which keeps every payload readable."""
    a_keys, b_keys = tmp_path / "a" / "keys", tmp_path / "b" / "keys"
    b = _open(engine, b_keys)
    b.append(make_event(0, tenant="acme"))  # a data key wrapped by B's KEK
    kek_b = LocalKeyProvider(b_keys / KEK_FILE).current_kek_id
    with engine.begin() as conn:  # the store as the old version left it: no identity
        conn.execute(delete(STATE).where(STATE.c.id == IDENTITY_ROW))
    # Replica A of the old version: its own KEK, wrapping the store's newest data key.
    provider_a = LocalKeyProvider(a_keys / KEK_FILE, create=True)
    kek_a = provider_a.current_kek_id
    for name in (PRIVATE_NAME, PUBLIC_NAME):
        shutil.copy2(b_keys / name, a_keys / name)
    old_a = AuditLog(
        engine, signer=load_or_create_signer(a_keys, create=False), keys=KeyRing(engine, provider_a)
    )
    old_a.append(make_event(1, tenant="globex"))
    # The upgraded A opens first: it holds the newest key's KEK, but not B's.
    with pytest.raises(
        KeyFileError, match=f"KEK\\(s\\) '{kek_b}', which .* does not hold: merge the KEK files"
    ):
        _open(engine, a_keys)
    assert _identity_rows(engine) == [1]
    _merge_kek_file(a_keys / KEK_FILE, b_keys / KEK_FILE)
    a = _open(engine, a_keys)
    assert a.read_payload(0) is not None and a.read_payload(1) is not None
    # B (its own file, without A's KEK) is told to merge, and merging keeps its own payloads readable.
    with pytest.raises(KeyFileError, match=f"wrapped by KEK '{kek_a}'.*merge the KEK files"):
        _open(engine, b_keys)
    _merge_kek_file(b_keys / KEK_FILE, a_keys / KEK_FILE)
    b = _open(engine, b_keys)
    assert b.read_payload(0) == a.read_payload(0) and b.read_payload(1) == a.read_payload(1)
