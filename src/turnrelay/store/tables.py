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
    # Where the turn's end is announced (a webhook), if anywhere.
    sa.Column("webhook_url", sa.String(2048), nullable=True),
    # The turn that answered this turn's user message again (a regenerate): a
    # superseded turn's messages leave the session's messages and the history.
    sa.Column("superseded_by", sa.String(36), nullable=True),
    # A pause for tool approvals (``TurnPause`` as JSON) and how many of its
    # approvals are still unanswered.
    sa.Column("paused", json_type(), nullable=True),
    sa.Column("pending_approvals", sa.Integer, nullable=False, server_default="0"),
    # Steering: a message sent with multitask=steer, and the running turn that
    # took it (before that turn's model request ``steered_step``).
    sa.Column("steer", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("steered_into", sa.String(36), nullable=True),
    sa.Column("steered_step", sa.Integer, nullable=True),
    # A client's message id names one turn per session: the idempotency key.
    sa.UniqueConstraint("session_id", "client_message_id", name="uq_turns_session_client_msg"),
    # Order within a session; also a backstop against two submits taking one seq.
    sa.UniqueConstraint("session_id", "seq", name="uq_turns_session_seq"),
    # count_running_for_user and the user's FIFO (waiting_heads).
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

# Retryable writes (through the db-manager): the call id the caller made, and
# what the write answered, recorded in the write's own transaction. Pruned
# after ``CALL_RETENTION`` (longer than any caller retries one call).
store_calls = sa.Table(
    "store_calls",
    metadata,
    sa.Column("call_id", sa.String(64), primary_key=True),
    sa.Column("method", sa.String(32), nullable=False),
    sa.Column("result", json_type(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Index("ix_store_calls_created", "created_at"),
)

# The webhook outbox: one row per turn end to announce, written by the terminal
# compare-and-set in its own transaction; executors claim due rows
# (``next_attempt_at``), send them and record each attempt.
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("turn_id", ID, nullable=False),
    sa.Column("session_id", ID, nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("payload", json_type(), nullable=False),
    # pending | delivered | failed (gave up after the last attempt)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("delivered_at", UtcDateTime(), nullable=True),
    sa.Index("ix_webhook_deliveries_turn", "turn_id"),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
)

# Tool calls held back for the user's approval: one row per request, answered
# once (by the user, or denied by the sweeper at ``expires_at``).
tool_approvals = sa.Table(
    "tool_approvals",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column(
        "turn_id",
        ID,
        sa.ForeignKey("turns.id", ondelete="CASCADE", name="fk_tool_approvals_turn"),
        nullable=False,
    ),
    sa.Column("call_id", sa.String(255), nullable=False),
    sa.Column("tool_name", sa.String(64), nullable=False),
    sa.Column("input", json_type(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
    sa.Column("approved", sa.Boolean, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("decided_at", UtcDateTime(), nullable=True),
    sa.Index("ix_tool_approvals_turn", "turn_id"),
    # expire_approvals: the unanswered ones past their expiry.
    sa.Index("ix_tool_approvals_open", "approved", "expires_at"),
)
