"""Sessions, turns and messages.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(36)


def _ts(name: str, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json() -> sa.types.TypeEngine[Any]:
    json = sa.JSON(none_as_null=True)
    return json.with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", ID, primary_key=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("title", sa.String(255), nullable=True),
        sa.Column("cli_session_id", sa.String(255), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
    )
    op.create_index("ix_sessions_user_updated", "sessions", ["user_id", "updated_at"])

    op.create_table(
        "turns",
        sa.Column("id", ID, primary_key=True),
        sa.Column(
            "session_id",
            ID,
            sa.ForeignKey("sessions.id", ondelete="CASCADE", name="fk_turns_session"),
            nullable=False,
        ),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("user_message_id", ID, nullable=False),
        sa.Column("assistant_message_id", ID, nullable=False),
        sa.Column("client_message_id", sa.String(255), nullable=True),
        sa.Column("dispatched", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("usage", _json(), nullable=True),
        sa.UniqueConstraint("session_id", "client_message_id", name="uq_turns_session_client_msg"),
        sa.UniqueConstraint("session_id", "seq", name="uq_turns_session_seq"),
    )
    op.create_index("ix_turns_user_status", "turns", ["user_id", "status", "dispatched"])
    op.create_index("ix_turns_status_session", "turns", ["status", "session_id", "seq"])

    op.create_table(
        "messages",
        sa.Column("id", ID, primary_key=True),
        sa.Column(
            "session_id",
            ID,
            sa.ForeignKey("sessions.id", ondelete="CASCADE", name="fk_messages_session"),
            nullable=False,
        ),
        sa.Column(
            "turn_id",
            ID,
            sa.ForeignKey("turns.id", ondelete="CASCADE", name="fk_messages_turn"),
            nullable=False,
        ),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False, server_default=""),
        sa.Column("parts", _json(), nullable=False),
        _ts("created_at"),
    )
    op.create_index("ix_messages_session", "messages", ["session_id"])
    op.create_index("ix_messages_turn", "messages", ["turn_id"])


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_table("turns")
    op.drop_table("sessions")
