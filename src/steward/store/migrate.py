"""Run the Alembic migrations programmatically (no alembic.ini needed by users).

`upgrade()` takes an advisory lock on PostgreSQL so two gateway processes starting together do not
both create the tables; on SQLite the migration runs inside BEGIN IMMEDIATE, which serialises them.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from steward.store.db import StoreError, make_engine

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_LOCK = 0x5E7A4D  # advisory lock id for migrations


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine | str | None = None, revision: str = "head") -> Engine:
    """Bring the store to `revision`; returns the engine used."""
    eng = engine if isinstance(engine, Engine) else make_engine(engine)
    cfg = alembic_config()
    try:
        with eng.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate the store at {eng.url.render_as_string()}: {exc}") from None
    return eng
