"""Alembic environment: always called with a connection from `steward.store.migrate.upgrade`."""

from __future__ import annotations

from alembic import context

import steward.audit.schema  # registers the audit tables
import steward.store.models  # noqa: F401  (registers the tables)
from steward.store.db import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached via the alembic CLI
    raise SystemExit("run migrations with `steward.store.migrate.upgrade()`")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
context.run_migrations()
