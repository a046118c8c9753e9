"""Tool approvals and steering: a turn can pause until the user approves or
denies tool calls, and can take messages sent while it runs.

``turns.paused`` holds the pause (what the runtime continues from) and
``turns.pending_approvals`` how many of its requests are unanswered;
``tool_approvals`` holds each request and its answer. ``turns.steer`` marks a
message sent with ``multitask: steer``; ``steered_into``/``steered_step`` say
which running turn took it, before which of its model requests.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("paused", _json(), nullable=True))
        batch.add_column(
            sa.Column("pending_approvals", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("steer", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("steered_into", sa.String(36), nullable=True))
        batch.add_column(sa.Column("steered_step", sa.Integer, nullable=True))
    op.create_table(
        "tool_approvals",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "turn_id",
            sa.String(36),
            sa.ForeignKey("turns.id", ondelete="CASCADE", name="fk_tool_approvals_turn"),
            nullable=False,
        ),
        sa.Column("call_id", sa.String(255), nullable=False),
        sa.Column("tool_name", sa.String(64), nullable=False),
        sa.Column("input", _json(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("approved", sa.Boolean, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_tool_approvals_turn", "tool_approvals", ["turn_id"])
    op.create_index("ix_tool_approvals_open", "tool_approvals", ["approved", "expires_at"])


def downgrade() -> None:
    op.drop_table("tool_approvals")
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("steered_step")
        batch.drop_column("steered_into")
        batch.drop_column("steer")
        batch.drop_column("pending_approvals")
        batch.drop_column("paused")
