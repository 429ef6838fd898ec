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
