"""Replicas sharing one store share one KEK and one checkpoint signer (review H1).

Before, every process whose keys directory was empty created its own KEK and signing key, even on a
store another replica already used: the second replica could not unwrap the first one's data keys
(its audited requests failed for good) and the checkpoint table held notes by two keys and origins,
so `verify` failed. The store now records the identity of both when they are first created, and a
process holding other keys refuses to start, naming what to copy.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine

from steward.audit.crypto import KeyFileError, LocalKeyProvider
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
    with pytest.raises(KeyFileError, match=f"wrapped by KEK '{kek_id}'.*copy {KEK_FILE}"):
        _open(engine, b_keys)
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
    with pytest.raises(KeyFileError, match="do not open with this KEK"):
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
