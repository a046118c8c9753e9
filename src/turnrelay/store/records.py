"""Rows to records: the store's shared selects and their mapping to ``store.base`` records.

A turn record carries its user message's text, so every turn is read through
``turn_query``, which joins the turn to that message.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.engine import RowMapping

from turnrelay.store.base import (
    ApprovalRecord,
    MessageRecord,
    SessionRecord,
    Steer,
    TurnPause,
    TurnRecord,
    TurnStatus,
    WebhookDelivery,
)
from turnrelay.store.tables import messages, turns

# The statuses of a turn that has not finished: queued or running.
ACTIVE = (TurnStatus.QUEUED.value, TurnStatus.RUNNING.value)

_user_message = messages.alias("user_message")


# Records as JSON and back: a recorded call's answer (``store_calls``) and the
# db-manager's wire format use the same codecs.
TURN_OR_NONE: TypeAdapter[TurnRecord | None] = TypeAdapter(TurnRecord | None)
TURNS: TypeAdapter[list[TurnRecord]] = TypeAdapter(list[TurnRecord])
BOOL: TypeAdapter[bool] = TypeAdapter(bool)
NOTHING: TypeAdapter[None] = TypeAdapter(type(None))
WEBHOOKS: TypeAdapter[list[WebhookDelivery]] = TypeAdapter(list[WebhookDelivery])
PAUSE: TypeAdapter[TurnPause] = TypeAdapter(TurnPause)
STEERS: TypeAdapter[list[Steer]] = TypeAdapter(list[Steer])


def new_id() -> str:
    return str(uuid.uuid4())


def turn_query() -> sa.Select[Any]:
    return sa.select(*turns.c, _user_message.c.content.label("user_text")).join(
        _user_message, _user_message.c.id == turns.c.user_message_id
    )


# The compare-and-set guard of every write an attempt makes (parameters
# ``p_turn_id``, ``p_attempt``): that attempt still holds the active turn.
HELD_BY_ATTEMPT = sa.and_(
    turns.c.id == sa.bindparam("p_turn_id"),
    turns.c.attempt == sa.bindparam("p_attempt"),
    turns.c.status.in_(ACTIVE),
)
# A turn by id (parameter ``turn_id``), built once: the hottest read.
TURN_BY_ID = turn_query().where(turns.c.id == sa.bindparam("turn_id"))


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
        superseded_by=m["superseded_by"],
        paused=PAUSE.validate_python(m["paused"]) if m["paused"] else None,
        pending_approvals=m["pending_approvals"],
        steered_into=m["steered_into"],
    )


def approval_record(m: RowMapping) -> ApprovalRecord:
    return ApprovalRecord(
        id=m["id"],
        turn_id=m["turn_id"],
        call_id=m["call_id"],
        tool_name=m["tool_name"],
        input=m["input"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        approved=m["approved"],
        reason=m["reason"],
        decided_at=m["decided_at"],
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


def webhook_record(m: RowMapping) -> WebhookDelivery:
    return WebhookDelivery(
        id=m["id"],
        turn_id=m["turn_id"],
        session_id=m["session_id"],
        url=m["url"],
        payload=m["payload"],
        status=m["status"],
        attempts=m["attempts"],
        next_attempt_at=m["next_attempt_at"],
        created_at=m["created_at"],
        last_status=m["last_status"],
        last_error=m["last_error"],
        delivered_at=m["delivered_at"],
    )
