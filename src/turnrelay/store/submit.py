"""Admitting, dispatching and finishing turns: the store's contended write transactions.

Each function takes the connection of a transaction its caller
(``SqlChatStore``) opened; ``submit``, ``dispatch_next`` and ``finish`` need a
writing one. How concurrent writers are serialised differs per dialect:

* **PostgreSQL** (asyncpg, READ COMMITTED): a submit or a dispatch locks its
  session row (``SELECT … FOR UPDATE``) first, so a session's submits and
  dispatches run one at a time; the terminal CAS is a single guarded ``UPDATE``,
  which PostgreSQL re-evaluates after waiting on the row, so exactly one writer
  matches. Locks are always taken session → turn → message, so these paths
  cannot deadlock one another.
* **SQLite**: the transaction already holds the database's write lock, taken by
  ``BEGIN IMMEDIATE`` (see ``turnrelay.store.engine``); ``FOR UPDATE`` is a
  no-op there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from turnrelay.errors import MessageIdConflict, RateLimited, SessionNotFound, TurnAlreadyActive
from turnrelay.store.base import (
    Multitask,
    NewTurn,
    SessionRecord,
    SubmitResult,
    TurnOutcome,
    TurnRecord,
    TurnStatus,
)
from turnrelay.store.records import ACTIVE, new_id, session_record, turn_query, turn_record
from turnrelay.store.tables import messages, sessions, turns

TITLE_MAX_CHARS = 80


def title_from(text: str) -> str | None:
    """The session title a first message gives: its first non-blank line, shortened."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:TITLE_MAX_CHARS]
    return None


async def submit(
    conn: AsyncConnection, new: NewTurn, clock: Callable[[], datetime]
) -> SubmitResult:
    """Admit ``new`` into its session, or return the turn its client message id made."""
    session = await lock_session(conn, new.session_id, new.user_id)
    if new.client_message_id is not None:
        row = (
            await conn.execute(
                turn_query().where(
                    turns.c.session_id == new.session_id,
                    turns.c.client_message_id == new.client_message_id,
                )
            )
        ).first()
        if row is not None:
            existing = turn_record(row._mapping)
            if existing.user_text != new.text:
                raise MessageIdConflict(
                    f"message_id {new.client_message_id} was already used for a different message"
                )
            earlier = await active_turns(conn, new.session_id, before_seq=existing.seq)
            return SubmitResult(existing, created=False, earlier_active=earlier)

    active = await active_turns(conn, new.session_id)
    if active and new.multitask is Multitask.REJECT:
        raise TurnAlreadyActive("the session already has an active turn", turn_id=active[0].id)
    if not active:
        # The per-user cap spans sessions, which the session lock does not
        # serialise: on PostgreSQL take a per-user transaction lock too.
        if conn.dialect.name == "postgresql":
            await conn.execute(
                sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(new.user_id)))
            )
        running = await count_active_for_user(conn, new.user_id)
        if running >= new.max_running_per_user:
            raise RateLimited(f"too many running turns: {running} of {new.max_running_per_user}")
    queued = sum(1 for t in active if t.status is TurnStatus.QUEUED)
    if queued >= new.max_queued_per_session:
        raise RateLimited(
            f"too many queued turns in this session: {queued} of {new.max_queued_per_session}"
        )

    now = clock()
    last_seq = (
        await conn.execute(
            sa.select(sa.func.coalesce(sa.func.max(turns.c.seq), 0)).where(
                turns.c.session_id == new.session_id
            )
        )
    ).scalar_one()
    turn = TurnRecord(
        id=new_id(),
        session_id=new.session_id,
        user_id=new.user_id,
        seq=int(last_seq) + 1,
        status=TurnStatus.QUEUED,
        attempt=0,
        model=new.model,
        user_text=new.text,
        user_message_id=new_id(),
        assistant_message_id=new_id(),
        client_message_id=new.client_message_id,
        dispatched=new.dispatch_if_idle and not active,
        cancel_requested=False,
        created_at=now,
    )
    await conn.execute(
        sa.insert(turns).values(
            id=turn.id,
            session_id=turn.session_id,
            user_id=turn.user_id,
            seq=turn.seq,
            status=turn.status.value,
            attempt=0,
            model=turn.model,
            user_message_id=turn.user_message_id,
            assistant_message_id=turn.assistant_message_id,
            client_message_id=turn.client_message_id,
            dispatched=turn.dispatched,
            dispatched_at=now if turn.dispatched else None,
            cancel_requested=False,
            created_at=now,
        )
    )
    await conn.execute(
        sa.insert(messages),
        [
            {
                "id": turn.user_message_id,
                "session_id": turn.session_id,
                "turn_id": turn.id,
                "role": "user",
                "content": new.text,
                "parts": [{"type": "text", "text": new.text}],
                "created_at": now,
            },
            {
                "id": turn.assistant_message_id,
                "session_id": turn.session_id,
                "turn_id": turn.id,
                "role": "assistant",
                "content": "",
                "parts": [],
                "created_at": now,
            },
        ],
    )
    values: dict[str, Any] = {"updated_at": now}
    if session.title is None:
        values["title"] = title_from(new.text)
    await conn.execute(sa.update(sessions).where(sessions.c.id == new.session_id).values(**values))
    return SubmitResult(turn, created=True, earlier_active=active)


async def dispatch_next(
    conn: AsyncConnection,
    session_id: str,
    clock: Callable[[], datetime],
    *,
    republish_before: datetime | None = None,
) -> TurnRecord | None:
    """The session's head turn to publish: its next queued turn, marked dispatched,
    unless one is already in flight. With ``republish_before``, an in-flight head
    that is still queued and whose publish was never confirmed (dispatched before
    that time) is returned again: its publisher died or failed before the broker
    confirmed it."""
    locked = (
        await conn.execute(
            sa.select(sessions.c.id).where(sessions.c.id == session_id).with_for_update()
        )
    ).first()
    if locked is None:
        return None
    in_flight = (
        await conn.execute(
            turn_query()
            .where(
                turns.c.session_id == session_id,
                turns.c.dispatched == sa.true(),
                turns.c.status.in_(ACTIVE),
            )
            .limit(1)
        )
    ).first()
    if in_flight is not None:
        since = in_flight.dispatched_at or in_flight.created_at
        if (
            republish_before is not None
            and in_flight.status == TurnStatus.QUEUED.value
            and in_flight.published_at is None
            and since < republish_before
        ):
            return turn_record(in_flight._mapping)
        return None
    row = (
        await conn.execute(
            turn_query()
            .where(
                turns.c.session_id == session_id,
                turns.c.status == TurnStatus.QUEUED.value,
            )
            .order_by(turns.c.seq)
            .limit(1)
        )
    ).first()
    if row is None:
        return None
    await conn.execute(
        sa.update(turns).where(turns.c.id == row.id).values(dispatched=True, dispatched_at=clock())
    )
    return dataclasses.replace(turn_record(row._mapping), dispatched=True)


async def finish(
    conn: AsyncConnection,
    turn_id: str,
    attempt: int,
    outcome: TurnOutcome,
    clock: Callable[[], datetime],
) -> bool:
    """Record ``outcome`` if ``attempt`` still holds the turn: the terminal CAS."""
    row = (
        await conn.execute(
            sa.select(turns.c.session_id, turns.c.assistant_message_id).where(turns.c.id == turn_id)
        )
    ).first()
    if row is None:
        return False
    # Session before turn: the lock order dispatch_next uses.
    await conn.execute(
        sa.select(sessions.c.id).where(sessions.c.id == row.session_id).with_for_update()
    )
    now = clock()
    result = await conn.execute(
        sa.update(turns)
        .where(
            turns.c.id == turn_id,
            turns.c.attempt == attempt,
            turns.c.status.in_(ACTIVE),
        )
        .values(
            status=outcome.status.value,
            error=outcome.error,
            usage=outcome.usage,
            finished_at=now,
        )
    )
    if result.rowcount != 1:
        return False
    await conn.execute(
        sa.update(messages)
        .where(messages.c.id == row.assistant_message_id)
        .values(content=outcome.content, parts=list(outcome.parts))
    )
    await conn.execute(
        sa.update(sessions).where(sessions.c.id == row.session_id).values(updated_at=now)
    )
    return True


async def lock_session(conn: AsyncConnection, session_id: str, user_id: str) -> SessionRecord:
    """Read (and on PostgreSQL lock) the user's session; ``SessionNotFound`` if not theirs."""
    row = (
        await conn.execute(sa.select(sessions).where(sessions.c.id == session_id).with_for_update())
    ).first()
    if row is None or row.user_id != user_id:
        raise SessionNotFound(f"session {session_id} not found")
    return session_record(row._mapping)


async def active_turns(
    conn: AsyncConnection, session_id: str, *, before_seq: int | None = None
) -> list[TurnRecord]:
    query = (
        turn_query()
        .where(turns.c.session_id == session_id, turns.c.status.in_(ACTIVE))
        .order_by(turns.c.seq)
    )
    if before_seq is not None:
        query = query.where(turns.c.seq < before_seq)
    return [turn_record(r._mapping) for r in (await conn.execute(query)).all()]


async def count_active_for_user(conn: AsyncConnection, user_id: str) -> int:
    """The user's sessions with a queued or running turn: each is one turn
    running or about to run (a session runs one turn at a time)."""
    count = (
        await conn.execute(
            sa.select(sa.func.count(sa.distinct(turns.c.session_id))).where(
                turns.c.user_id == user_id, turns.c.status.in_(ACTIVE)
            )
        )
    ).scalar_one()
    return int(count)
