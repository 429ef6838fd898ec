"""The throwaway PostgreSQL and Redis fixtures really start, serve, isolate and stop."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import text

from servers import PostgresServer, RedisServer, port_open
from steward.store import make_engine


def test_pg_url_serves_sqlalchemy(pg_url: str) -> None:
    assert pg_url.startswith("postgresql+psycopg://") and "@127.0.0.1:" in pg_url
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
            assert str(conn.execute(text("SHOW server_version")).scalar()).split(".")[0].isdigit()
    finally:
        engine.dispose()


def test_fresh_pg_url_is_a_new_empty_database(pg_url: str, fresh_pg_url: str) -> None:
    assert fresh_pg_url != pg_url
    engine = make_engine(fresh_pg_url)
    try:
        with engine.begin() as conn:
            n = conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar()
            assert n == 0
            conn.execute(text("CREATE TABLE only_here (x int)"))
    finally:
        engine.dispose()


def test_redis_url_and_flush(redis_url: str, fresh_redis_url: str) -> None:
    assert redis_url == fresh_redis_url and redis_url.startswith("redis://127.0.0.1:")
    client = redis.Redis.from_url(fresh_redis_url)
    try:
        assert client.dbsize() == 0
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()


def test_fresh_redis_url_starts_empty(fresh_redis_url: str) -> None:
    client = redis.Redis.from_url(fresh_redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


def test_postgres_server_starts_and_stops(pg_server: PostgresServer) -> None:
    """A second cluster of its own: after `stop` its port is closed and its directory is gone."""
    server = PostgresServer()
    server.start()
    tmp = server.tmp
    try:
        assert tmp is not None and (tmp / "data" / "PG_VERSION").exists()
        if os.geteuid() == 0:
            assert Path(tmp).owner() == "postgres"  # PostgreSQL refuses root
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    finally:
        server.stop()
    assert not port_open(server.port)
    assert tmp is not None and not tmp.exists()


def test_redis_server_starts_and_stops() -> None:
    server = RedisServer()
    server.start()
    tmp, proc = server.tmp, server.proc
    try:
        assert redis.Redis(port=server.port).ping()
    finally:
        server.stop()
    assert proc is not None and proc.poll() is not None
    assert not port_open(server.port)
    assert tmp is not None and not tmp.exists()


def test_missing_binary_skips_or_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from servers import missing

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server"):
        missing("redis-server not found")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        missing("redis-server not found")
