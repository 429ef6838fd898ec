"""Audit log: leaves, signed checkpoints, wrapped data keys, cached Merkle nodes, sequencer row.

Revision ID: 0002_audit
Revises: 0001_gateway
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_audit"
down_revision = "0001_gateway"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(40), nullable=False),
        sa.Column("time_us", sa.BigInteger(), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("subject_ref", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("leaf", sa.LargeBinary(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("idx", name="pk_audit_events"),
        sa.UniqueConstraint("event_id", name="uq_audit_events_event_id"),
    )
    op.create_index("ix_audit_events_tenant_time", "audit_events", ["tenant", "time_us"])
    op.create_index("ix_audit_events_time_us", "audit_events", ["time_us"])
    op.create_index("ix_audit_events_request_id", "audit_events", ["request_id"])
    op.create_index("ix_audit_events_subject_ref", "audit_events", ["subject_ref"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("size", name="pk_audit_checkpoints"),
    )
    op.create_table(
        "data_keys",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("subject_ref", sa.String(64), nullable=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("kek_id", sa.String(64), nullable=True),
        sa.Column("retired_us", sa.BigInteger(), nullable=True),
        sa.Column("wrapped", sa.LargeBinary(), nullable=True),
        sa.Column("destroyed_us", sa.BigInteger(), nullable=True),
        sa.Column("destroy_reason", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_data_keys"),
    )
    op.create_index("ix_data_keys_tenant_subject", "data_keys", ["tenant", "subject_ref", "purpose"])
    op.create_table(
        "merkle_nodes",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_merkle_nodes"),
    )
    state = op.create_table(
        "merkle_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("frontier", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_merkle_state"),
    )
    # The one sequencer row every append locks; seeded here so appenders never race to create it.
    op.bulk_insert(state, [{"id": 1, "size": 0, "frontier": b""}])


def downgrade() -> None:
    op.drop_table("merkle_state")
    op.drop_table("merkle_nodes")
    op.drop_index("ix_data_keys_tenant_subject", "data_keys")
    op.drop_table("data_keys")
    op.drop_table("audit_checkpoints")
    for ix in ("subject_ref", "request_id", "time_us", "tenant_time"):
        op.drop_index(f"ix_audit_events_{ix}", "audit_events")
    op.drop_table("audit_events")
