"""Call ids of retryable writes, recorded in the write's own transaction.

An executor that reaches the database through the db-manager may send one
write twice (a timeout, a restarted db-manager, another replica behind a load
balancer). Each such write carries a call id made by the caller; the store
records the id with the write's result in the same transaction, so a repeat
answers what the first one did (a finish that won answers "won") instead of
running the compare-and-set again and losing to itself.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "store_calls",
        sa.Column("call_id", sa.String(64), primary_key=True),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column(
            "result",
            sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_store_calls_created", "store_calls", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_store_calls_created", table_name="store_calls")
    op.drop_table("store_calls")
