"""Limit settle markers: a settle retried after its COMMIT went through applies nothing.

Revision ID: 0003_limit_settled
Revises: 0002_audit
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_limit_settled"
down_revision = "0002_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "limit_settled",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_limit_settled"),
    )
    op.create_index("ix_limit_settled_expires_at", "limit_settled", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_limit_settled_expires_at", "limit_settled")
    op.drop_table("limit_settled")
