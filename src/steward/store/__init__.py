"""Persistent state shared by the gateway and the audit log: SQLAlchemy models, engines, migrations.

SQLite (WAL) is the default store, PostgreSQL is chosen by URL; both run the same Alembic migrations.
"""

from steward.store.db import Base, StoreError, database_url, make_engine
from steward.store.migrate import upgrade

__all__ = ["Base", "StoreError", "database_url", "make_engine", "upgrade"]
