"""ORM models of the audit tables; Alembic revision 0002_audit creates them.

Only `audit_events` and `audit_checkpoints` carry "audit" in their names (the issue reserves those
words). Everything else here is either a cache the verifier re-derives and compares (`merkle_nodes`,
`merkle_state`) or key material that is deliberately outside the tree (`data_keys`: destroying a key
must not change a leaf).
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from steward.store.db import Base

NODE_LEVEL_SHIFT = 50  # merkle_nodes.id = level << 50 | index: one integer key, one IN (...) per proof


class AuditEventRow(Base):
    """One leaf. `leaf` is the exact hashed bytes; every other column is re-derived from it."""

    __tablename__ = "audit_events"

    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    time_us: Mapped[int] = mapped_column(BigInteger)
    tenant: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    subject_ref: Mapped[str | None] = mapped_column(String(64), nullable=True)
    outcome: Mapped[str] = mapped_column(String(32))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    leaf: Mapped[bytes] = mapped_column(LargeBinary)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))

    __table_args__ = (
        Index("ix_audit_events_tenant_time", "tenant", "time_us"),
        Index("ix_audit_events_time_us", "time_us"),
        Index("ix_audit_events_request_id", "request_id"),
        Index("ix_audit_events_subject_ref", "subject_ref"),
    )


class AuditCheckpointRow(Base):
    """A signed checkpoint; `size` and `root_hash` are re-derived from `note` by the verifier."""

    __tablename__ = "audit_checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_us: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(Text)


class DataKeyRow(Base):
    """A data key wrapped by the KEK; `wrapped` is NULL once destroyed (erased or expired)."""

    __tablename__ = "data_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    subject_ref: Mapped[str | None] = mapped_column(String(64), nullable=True)
    purpose: Mapped[str] = mapped_column(String(16))  # "payload" | "pseudonym"
    created_us: Mapped[int] = mapped_column(BigInteger)
    kek_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    retired_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # no new payloads after
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    destroyed_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    destroy_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (Index("ix_data_keys_tenant_subject", "tenant", "subject_ref", "purpose"),)


class MerkleNodeRow(Base):
    """Cached perfect-subtree hashes at levels >= CACHE_LEVEL, so proofs read O(log n) rows."""

    __tablename__ = "merkle_nodes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class MerkleStateRow(Base):
    """The sequencer row: tree size and compact range. Locked by every append (the log's one writer)."""

    __tablename__ = "merkle_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger)
    frontier: Mapped[bytes] = mapped_column(LargeBinary)


# Core handles for the hot paths (bulk insert, streaming selects), typed as Tables for mypy.
EVENTS = cast(Table, AuditEventRow.__table__)
CHECKPOINTS = cast(Table, AuditCheckpointRow.__table__)
DATA_KEYS = cast(Table, DataKeyRow.__table__)
NODES = cast(Table, MerkleNodeRow.__table__)
STATE = cast(Table, MerkleStateRow.__table__)
