"""Gateway tables: tenants, API keys, limit counters, leases and settle markers.

Audit tables live with the audit log (`steward.audit`); every table is created by Alembic migrations
under `steward/store/migrations`, never by `create_all`, so SQLite and PostgreSQL stay identical.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from steward.store.db import Base


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    policy: Mapped[str | None] = mapped_column(String(128), nullable=True)  # None = default policy
    limits: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32))  # shown to identify the key; never enough to use it
    hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex of the whole key
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None = every model
    limits: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LimitCounter(Base):
    """Usage of one scope (key or tenant) for one kind (requests, tokens, spend) in one fixed window."""

    __tablename__ = "limit_counters"

    scope: Mapped[str] = mapped_column(String(96), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    window: Mapped[str] = mapped_column(String(8), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix seconds
    used: Mapped[float] = mapped_column(Float, default=0.0)


class LimitLease(Base):
    """One in-flight request counted against a concurrency limit; expires if its worker dies."""

    __tablename__ = "limit_leases"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(String(96))
    expires_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_limit_leases_scope", "scope"),)


class LimitSettled(Base):
    """A settled reservation whose settle changed counters, so a retried settle applies nothing.

    Written in the settle's own transaction: a settle whose COMMIT went through but whose reply was
    lost finds it on retry and counts as done. Rows expire (`expires_at`, unix seconds) long after
    any retry can come, and the limiter deletes expired ones now and then.
    """

    __tablename__ = "limit_settled"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the reservation id
    expires_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_limit_settled_expires_at", "expires_at"),)
