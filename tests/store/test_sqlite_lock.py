"""SQLite write-lock waiting: fine polling instead of SQLite's coarse busy handler."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_begin_immediate_waits_for_the_lock_finely_and_gives_up_at_its_deadline(tmp_path: Path) -> None:
    import sqlite3
    import threading
    import time

    from steward.store.db import begin_immediate

    path = tmp_path / "lock.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("PRAGMA busy_timeout=0")
    waiter = sqlite3.connect(path, isolation_level=None)
    waiter.execute("PRAGMA busy_timeout=0")

    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(waiter, wait_s=0.05)  # held throughout: gives up, does not hang

    released = []

    def release() -> None:
        time.sleep(0.2)
        holder.execute("COMMIT")
        released.append(time.monotonic())

    t = threading.Thread(target=release)
    t.start()
    begin_immediate(waiter, wait_s=5)
    got = time.monotonic()
    t.join()
    assert waiter.in_transaction
    # took the lock within a few milliseconds of its release (SQLite's own handler sleeps up to 100 ms)
    assert got - released[0] < 0.02
    waiter.execute("COMMIT")


def test_a_lock_held_past_the_wait_is_a_store_failure_not_a_raw_sqlite3_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer holding SQLite's lock past the wait (an erase, a backup, the sqlite3 CLI) must give
    the callers' store-unavailable errors (a 503), as any store failure does, never a 500."""
    import asyncio
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from steward.gateway.keys import KeyStore
    from steward.gateway.limits import Limit, LimiterUnavailable, SQLLimiter
    from steward.store import StoreError, db, upgrade

    engine = upgrade(f"sqlite:///{tmp_path / 'steward.db'}")
    keys = KeyStore(engine, ttl_s=0)
    key, _ = keys.create("acme", "user")
    limiter = SQLLimiter(engine, lock_wait_s=0.2)
    monkeypatch.setattr(db.begin_immediate, "__defaults__", (0.2,))  # the 30 s wait, shortened
    blocker = sqlite3.connect(tmp_path / "steward.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError, match="locked"), engine.begin():
            pass
        with pytest.raises(LimiterUnavailable):
            asyncio.run(limiter.reserve([Limit("tenant:acme", "requests", "day", 5)], {"requests": 1}))
        with pytest.raises(StoreError):
            keys.create("acme", "user")  # a write (reads take no lock: see the next test)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert keys.authenticate(key) is not None
    engine.dispose()


def test_reads_do_not_take_the_write_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WAL lets readers run beside a writer; only writers need BEGIN IMMEDIATE. Reads that took
    the write lock queued key lookups, audit proofs and `steward audit verify` behind every append
    (and a long verify held appends off for its whole run)."""
    import sqlite3

    from sqlalchemy import text

    from audit.helpers import make_event
    from steward.audit.log import AuditLog
    from steward.audit.note import PUBLIC_NAME, load_verifier
    from steward.audit.verify import verify_store
    from steward.gateway.keys import KeyStore
    from steward.store import db, upgrade

    url = f"sqlite:///{tmp_path / 'steward.db'}"
    engine = upgrade(url)
    keys = KeyStore(engine, ttl_s=0)
    key, record = keys.create("acme", "user")
    log = AuditLog.open(engine, tmp_path / "keys")
    log.append(make_event(0))
    log.checkpoint()
    monkeypatch.setattr(db.begin_immediate, "__defaults__", (0.2,))  # the 30 s wait, shortened
    blocker = sqlite3.connect(tmp_path / "steward.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        # every read below would wait out the (shortened) lock wait and fail under the old begin hook
        assert keys.authenticate(key) is not None
        assert [k.id for k in keys.list("acme")] == [record.id]
        assert log.size() == 1
        assert log.inclusion_proof(0).index == 0
        assert verify_store(engine, load_verifier(tmp_path / "keys" / PUBLIC_NAME)).ok
    finally:
        blocker.execute("COMMIT")
        blocker.close()

    # and the other way round: an open read transaction does not keep a writer out
    with db.reading(engine).connect() as reader:
        assert reader.execute(text("SELECT count(*) FROM api_keys")).scalar() == 1
        assert reader.in_transaction()
        keys.create("acme", "user")  # a write, while the read transaction is still open
        # the reader's snapshot is stable for its transaction
        assert reader.execute(text("SELECT count(*) FROM api_keys")).scalar() == 1
    assert len(keys.list("acme")) == 2
    engine.dispose()


def test_a_write_through_a_reading_engine_is_refused(tmp_path: Path) -> None:
    """A connection marked for reading starts a deferred transaction; a write through it could
    fail with SQLITE_BUSY on its lock upgrade instead of waiting, so it is refused outright."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from steward.store import db, upgrade

    engine = upgrade(f"sqlite:///{tmp_path / 'steward.db'}")
    with pytest.raises(OperationalError, match=r"readonly"), db.reading(engine).begin() as conn:
        conn.execute(text("DELETE FROM api_keys"))
    with engine.begin() as conn:  # the pooled connection is a writer again afterwards
        conn.execute(text("DELETE FROM api_keys"))
    engine.dispose()


def test_a_reservation_waits_for_the_lock_only_its_own_short_wait(tmp_path: Path) -> None:
    """A request waiting to be admitted gets its 503 after the limiter's short wait, not after the
    store's 30 s; the wait is the engine option `lock_wait`, per transaction."""
    import asyncio
    import sqlite3
    import time

    from steward.gateway.limits import Limit, LimiterUnavailable, SQLLimiter
    from steward.store import upgrade

    engine = upgrade(f"sqlite:///{tmp_path / 'steward.db'}")
    limiter = SQLLimiter(engine, lock_wait_s=0.3)
    limit = [Limit("tenant:acme", "requests", "day", 5)]
    blocker = sqlite3.connect(tmp_path / "steward.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            asyncio.run(limiter.reserve(limit, {"requests": 1}))
        assert 0.25 < time.monotonic() - t0 < 3
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    res = asyncio.run(limiter.reserve(limit, {"requests": 1}))
    asyncio.run(limiter.settle(res, {"requests": 1}))
    asyncio.run(limiter.aclose())
    engine.dispose()
