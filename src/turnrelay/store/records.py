"""Rows to records: the store's shared selects and their mapping to ``store.base`` records.

A turn record carries its user message's text, so every turn is read through
``turn_query``, which joins the turn to that message.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from turnrelay.store.base import MessageRecord, SessionRecord, TurnRecord, TurnStatus
from turnrelay.store.tables import messages, turns

# The statuses of a turn that has not finished: queued or running.
ACTIVE = (TurnStatus.QUEUED.value, TurnStatus.RUNNING.value)

_user_message = messages.alias("user_message")


def new_id() -> str:
    return str(uuid.uuid4())


def turn_query() -> sa.Select[Any]:
    return sa.select(*turns.c, _user_message.c.content.label("user_text")).join(
        _user_message, _user_message.c.id == turns.c.user_message_id
    )


def turn_record(m: RowMapping) -> TurnRecord:
    return TurnRecord(
        id=m["id"],
        session_id=m["session_id"],
        user_id=m["user_id"],
        seq=m["seq"],
        status=TurnStatus(m["status"]),
        attempt=m["attempt"],
        model=m["model"],
        user_text=m["user_text"],
        user_message_id=m["user_message_id"],
        assistant_message_id=m["assistant_message_id"],
        client_message_id=m["client_message_id"],
        dispatched=bool(m["dispatched"]),
        cancel_requested=bool(m["cancel_requested"]),
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        error=m["error"],
        usage=m["usage"],
    )


def session_record(m: RowMapping) -> SessionRecord:
    return SessionRecord(
        id=m["id"],
        user_id=m["user_id"],
        title=m["title"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        cli_session_id=m["cli_session_id"],
    )


def message_record(m: RowMapping) -> MessageRecord:
    return MessageRecord(
        id=m["id"],
        session_id=m["session_id"],
        turn_id=m["turn_id"],
        role=m["role"],
        content=m["content"],
        parts=list(m["parts"] or []),
        status=TurnStatus(m["status"]),
        created_at=m["created_at"],
    )
