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
    limiter = SQLLimiter(engine)
    monkeypatch.setattr(db.begin_immediate, "__defaults__", (0.2,))  # the 30 s wait, shortened
    blocker = sqlite3.connect(tmp_path / "steward.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError, match="locked"), engine.begin():
            pass
        with pytest.raises(LimiterUnavailable):
            asyncio.run(limiter.reserve([Limit("tenant:acme", "requests", "day", 5)], {"requests": 1}))
        with pytest.raises(StoreError):
            keys.authenticate(key)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert keys.authenticate(key) is not None
    engine.dispose()
