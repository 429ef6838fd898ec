"""Engines for SQLite and PostgreSQL, configured the same way wherever they are made.

SQLite gets WAL (readers never block the writer), the write lock taken up front and polled for
finely (several workers share one file) and foreign keys; PostgreSQL goes through psycopg 3. URLs
name the driver so a bare `postgresql://` works.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import NullPool

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StoreError(RuntimeError):
    """The store cannot be reached, opened or migrated."""


def data_dir() -> Path:
    return Path(os.environ.get("STEWARD_DATA_DIR") or "steward-data")


def database_url(url: str | None = None) -> str:
    """`url`, else `STEWARD_DATABASE_URL`, else SQLite at `$STEWARD_DATA_DIR/steward.db`."""
    url = url or os.environ.get("STEWARD_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{(data_dir() / 'steward.db').resolve()}"


def _normalise(url: str) -> URL:
    try:
        u = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"invalid database URL ({exc})") from None
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"unsupported database {u.get_backend_name()!r}; use sqlite:/// or postgresql://")
    return u


SQLITE_LOCK_WAIT_S = 30.0
_POLL_S = (0.0001, 0.0002, 0.0005, 0.001)  # then every 1 ms


def begin_immediate(dbapi_conn: Any, wait_s: float = SQLITE_LOCK_WAIT_S) -> None:
    """BEGIN IMMEDIATE on a sqlite3 connection, waiting up to `wait_s` for another writer.

    Why not SQLite's own busy timeout: its handler sleeps 1, 2, 5, 10, ... then 100 ms between tries,
    so with two gateway workers committing audit batches a contended request sat out sleeps of tens
    of milliseconds while the lock was free again within a fraction of one (p99 ~390 ms at 8
    connections and 2 workers). Transactions here last well under a millisecond; polling at
    0.1-1 ms gets the lock within about one transaction of its release.
    """
    _execute_when_unlocked(dbapi_conn, "BEGIN IMMEDIATE", wait_s)


def _execute_when_unlocked(dbapi_conn: Any, sql: str, wait_s: float = SQLITE_LOCK_WAIT_S) -> None:
    """Run `sql`, retrying while SQLite answers "locked"/"busy", polling finely up to `wait_s`.

    Also for `PRAGMA journal_mode=WAL` on a new database: two processes opening it at once both
    read the schema, and the one that then needs the exclusive lock gets SQLITE_BUSY at once (SQLite
    skips the busy handler where waiting could deadlock), so the connect-time timeout never helps.
    """
    deadline = 0.0
    attempt = 0
    while True:
        try:
            dbapi_conn.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            now = time.monotonic()
            if not deadline:
                deadline = now + wait_s
            elif now >= deadline:
                raise
        time.sleep(_POLL_S[min(attempt, len(_POLL_S) - 1)])
        attempt += 1


READ_ONLY = "steward_read_only"
LOCK_WAIT = "steward_lock_wait_s"


def reading(engine: Engine) -> Engine:
    """`engine` for reads only: on SQLite its transactions take no write lock (a key lookup, an
    audit proof or a whole `steward audit verify` no longer queues behind, or holds off, the
    gateway's appends) and refuse writes. Same pool; no effect on PostgreSQL, whose reads never
    locked writers out."""
    return engine.execution_options(**{READ_ONLY: True})


def lock_wait(engine: Engine, wait_s: float) -> Engine:
    """`engine` whose SQLite write transactions wait at most `wait_s` for the lock (default
    `SQLITE_LOCK_WAIT_S`): for callers that answer a request and would rather fail fast."""
    return engine.execution_options(**{LOCK_WAIT: wait_s})


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    from sqlalchemy import create_engine

    u = _normalise(database_url(url))
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # Pooled: opening a SQLite connection costs four PRAGMAs, and closing the last one on a WAL
        # database checkpoints and deletes the WAL file — per audit batch that was the gateway's
        # largest cost. WAL + BEGIN IMMEDIATE + busy_timeout keep pooled connections safe across
        # threads and processes. An in-memory database gets no pool (each connection is its own db).
        if db in (None, "", ":memory:"):
            kwargs.setdefault("poolclass", NullPool)
        else:
            kwargs.setdefault("pool_size", 8)
            kwargs.setdefault("max_overflow", 16)
        kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
        engine = create_engine(u, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Python's sqlite3 opens transactions lazily; take control so BEGIN IMMEDIATE works.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            _execute_when_unlocked(dbapi_conn, "PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # No busy handler: every transaction starts with BEGIN IMMEDIATE (below), the only
            # statement that waits for the write lock in WAL mode, and `begin_immediate` polls for
            # that lock itself, finely (see there).
            cur.execute("PRAGMA busy_timeout=0")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # Writers take the lock up front: a deferred transaction that later upgrades to a write
            # lock can fail with SQLITE_BUSY instead of waiting. Readers (`reading`) take none: in
            # WAL mode a deferred transaction reads a stable snapshot beside any writer, and is
            # made query-only so that a write through it fails at once instead of sometimes.
            # A lock held past the wait raises sqlite3's own error, which SQLAlchemy does not wrap
            # for an event listener: wrap it, so every caller sees the same store failure
            # (`SQLAlchemyError`, a 503) as any other.
            opts = conn.get_execution_options()
            record = conn.connection
            read = bool(opts.get(READ_ONLY))
            sql = "BEGIN" if read else "BEGIN IMMEDIATE"
            try:
                if record.info.get(READ_ONLY, False) != read:
                    record.dbapi_connection.execute(f"PRAGMA query_only={'ON' if read else 'OFF'}")
                    record.info[READ_ONLY] = read
                if read:
                    _execute_when_unlocked(record.dbapi_connection, sql)
                elif LOCK_WAIT in opts:
                    begin_immediate(record.dbapi_connection, float(opts[LOCK_WAIT]))
                else:
                    begin_immediate(record.dbapi_connection)
            except sqlite3.Error as exc:
                raise OperationalError(sql, None, exc) from exc

        @event.listens_for(engine, "checkin")
        def _writer_again(dbapi_conn: Any, record: Any) -> None:
            # A pooled connection goes back as a writer: raw uses after the next checkout
            # (PRAGMAs, checkpoints) must not find it query-only.
            if record.info.pop(READ_ONLY, False):
                try:
                    dbapi_conn.execute("PRAGMA query_only=OFF")
                except sqlite3.Error:
                    record.invalidate()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    return create_engine(u, **kwargs)
