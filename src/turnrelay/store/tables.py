"""The ChatStore's tables: sessions, turns and messages (SQLAlchemy Core).

One turn owns two messages (its user entry and its assistant entry); the turn
keeps their ids, and each message points back at its turn, so deleting a session
cascades to its turns and from them to their messages. The turn does not carry a
foreign key to its messages: that would make the two tables reference each other.

These definitions are the code's view of the schema; the migrations under
``migrations/versions`` are what creates it, and must agree with them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every dialect.

    SQLite has no timestamp type and hands back naive values; PostgreSQL hands
    back aware ones. Both are normalised to aware UTC so records compare equal
    whatever the backend.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        # SQLite stores the text form: keep it naive so it sorts lexicographically.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def json_type() -> sa.types.TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL."""
    return sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


ID = sa.String(36)  # uuid4 text

metadata = sa.MetaData()

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("title", sa.String(255), nullable=True),
    sa.Column("cli_session_id", sa.String(255), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    # list_sessions: a user's sessions, newest updated first.
    sa.Index("ix_sessions_user_updated", "user_id", "updated_at"),
)

turns = sa.Table(
    "turns",
    metadata,
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
    # When the turn became its session's head, and when the broker confirmed its
    # message (NULL: not yet, or the publisher died first; the sweeper's cue).
    sa.Column("dispatched_at", UtcDateTime(), nullable=True),
    sa.Column("published_at", UtcDateTime(), nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=True),
    sa.Column("finished_at", UtcDateTime(), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("usage", json_type(), nullable=True),
    # A client's message id names one turn per session: the idempotency key.
    sa.UniqueConstraint("session_id", "client_message_id", name="uq_turns_session_client_msg"),
    # Order within a session; also a backstop against two submits taking one seq.
    sa.UniqueConstraint("session_id", "seq", name="uq_turns_session_seq"),
    # count_active_for_user.
    sa.Index("ix_turns_user_status", "user_id", "status", "dispatched"),
    # undispatched_heads (the sweeper) and active_turns.
    sa.Index("ix_turns_status_session", "status", "session_id", "seq"),
)

messages = sa.Table(
    "messages",
    metadata,
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
    sa.Column("parts", json_type(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Index("ix_messages_session", "session_id"),
    sa.Index("ix_messages_turn", "turn_id"),
)
