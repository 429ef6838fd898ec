"""Audit fixtures: a migrated store per test, on SQLite and on PostgreSQL.

PostgreSQL is the throwaway server of `tests/servers.py` (`fresh_pg_url`: a new database per test);
where PostgreSQL is not installed those variants skip loudly (fail under CI).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from steward.audit.log import AuditLog
from steward.store.db import make_engine
from steward.store.migrate import upgrade


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'steward.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    eng = upgrade(make_engine(url))
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = upgrade(make_engine(f"sqlite:///{tmp_path / 'steward.db'}"))
    yield eng
    eng.dispose()


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def log(engine: Engine, keys_dir: Path) -> AuditLog:
    return AuditLog.open(engine, keys_dir, checkpoint_every=10, checkpoint_interval_s=3600)
