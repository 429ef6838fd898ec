"""The store on SQLite and PostgreSQL: the same migrations, the same key semantics."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import sqlalchemy as sa

from gateway_harness import free_port, start_gateway
from steward.gateway.keys import KeyStore, hash_key
from steward.gateway.settings import Settings
from steward.store import StoreError, make_engine, upgrade

TABLES = {"tenants", "api_keys", "limit_counters", "limit_leases"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'steward.db'}"
    return str(request.getfixturevalue("fresh_pg_url"))


def test_migrations_create_the_same_tables_and_are_idempotent(db_url: str) -> None:
    engine = upgrade(db_url)
    names = set(sa.inspect(engine).get_table_names())
    assert names >= TABLES | {"alembic_version"}
    upgrade(engine)  # a second start changes nothing
    with engine.connect() as c:
        assert c.execute(sa.text("select count(*) from alembic_version")).scalar() == 1
    if engine.dialect.name == "sqlite":
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_two_processes_migrating_at_once_do_not_collide(db_url: str) -> None:
    code = "import sys; from steward.store import upgrade; upgrade(sys.argv[1]).dispose()"
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-800:]
    assert set(sa.inspect(make_engine(db_url)).get_table_names()) >= TABLES


def test_keys_on_both_stores(db_url: str) -> None:
    store = KeyStore(upgrade(db_url), ttl_s=0.0)
    key, rec = store.create(
        "acme", "user", models=["builtin"], limits=[{"kind": "requests", "window": "day", "limit": 2}]
    )
    p = store.authenticate(key)
    assert p is not None and p.tenant == "acme" and p.allowed_models == ("builtin",) and p.key_limits
    with store.engine.connect() as c:
        stored = c.execute(sa.text("select hash, prefix from api_keys")).one()
    assert stored.hash == hash_key(key) and key not in tuple(stored) and stored.prefix == key[:11]
    # SQL in the key is data, never code
    assert store.authenticate("sk-stw-' OR 1=1 --") is None
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    store.set_tenant("acme", limits=[{"kind": "tokens", "window": "day", "limit": 100}])
    assert store.authenticate(key).tenant_limits  # type: ignore[union-attr]
    store.revoke(rec.id)
    assert store.authenticate(key) is None
    expiring, _ = store.create("acme", "user", expires_in_s=1)
    assert store.authenticate(expiring) is not None
    assert store.authenticate(expiring, now=time.time() + 2) is None
    assert next(r.id for r in store.list("acme")) == rec.id
    store.engine.dispose()


def test_concurrent_creation_for_a_new_tenant_never_collides(db_url: str) -> None:
    """Keys and tenant updates racing for a tenant that does not exist yet all succeed (on
    PostgreSQL both transactions see it missing; the second insert must not fail on the key)."""
    import threading

    store = KeyStore(upgrade(db_url), ttl_s=0.0)
    errors: list[BaseException] = []
    for r in range(8):
        barrier = threading.Barrier(3)

        def go(i: int, tenant: str = f"t{r}", barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                if i == 2:
                    store.set_tenant(tenant, limits=[{"kind": "requests", "window": "day", "limit": 9}])
                else:
                    store.create(tenant, "user")
            except BaseException as exc:  # collected, asserted below
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert all(len(list(store.list(f"t{r}"))) == 2 for r in range(8))
    store.engine.dispose()


def test_unreachable_store_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="cannot migrate"):
        upgrade("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="unsupported database"):
        make_engine("mysql://x@y/z")


@pytest.fixture
def pg_gateway(fresh_pg_url: str, tmp_path: Path) -> Iterator[object]:
    settings = Settings(data_dir=tmp_path, port=free_port(), database_url=fresh_pg_url, embedding_model="")
    yield from start_gateway(settings)


def test_gateway_on_postgresql(pg_gateway: object) -> None:
    gw = pg_gateway
    key = gw.key("pgco", "user", limits=[{"kind": "requests", "window": "day", "limit": 2}])  # type: ignore[attr-defined]
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)  # type: ignore[attr-defined]
    msgs = [{"role": "user", "content": "hello"}]
    assert c.chat.completions.create(model="builtin", messages=msgs, max_tokens=2).choices  # type: ignore[arg-type]
    assert c.chat.completions.create(model="builtin", messages=msgs, max_tokens=2).choices  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="builtin", messages=msgs, max_tokens=2)  # type: ignore[arg-type]
