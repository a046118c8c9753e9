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
from turnrelay.store.records import (
    ACTIVE,
    HELD_BY_ATTEMPT,
    new_id,
    session_record,
    turn_query,
    turn_record,
)
from turnrelay.store.tables import messages, sessions, turns, webhook_deliveries

TITLE_MAX_CHARS = 80
# Seconds a client is told to wait when the user's waiting queue is full.
WAITING_RETRY_AFTER = 5


def title_from(text: str) -> str | None:
    """The session title a first message gives: its first non-blank line, shortened."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:TITLE_MAX_CHARS]
    return None


async def submit(
    conn: AsyncConnection, new: NewTurn, clock: Callable[[], datetime]
) -> SubmitResult:
    """Admit ``new`` into its session, or return the turn its client message id made.

    A turn that is its session's head is dispatched at once (with
    ``dispatch_if_idle``) only when the user has a free running slot left after
    every head waiting for one; otherwise it waits in the user's FIFO, up to
    ``max_waiting_per_user`` heads, and ``dispatch_next`` admits it later."""
    # The user before the session: the lock order ``dispatch_next`` uses too.
    await lock_user(conn, new.user_id)
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
    dispatch = False
    if not active:
        waiting = await count_waiting_for_user(conn, new.user_id)
        running = await count_running_for_user(conn, new.user_id)
        # Room for every waiting head and this one: it need not wait behind
        # them (they are admitted as their dispatch comes: a session's next turn
        # is a waiting head between its previous turn's finish and the dispatch
        # after it, and a burst of submits in that moment must not pile up
        # behind it while slots are free). Else the FIFO's order holds.
        if running + waiting < new.max_running_per_user:
            dispatch = new.dispatch_if_idle
        elif waiting >= new.max_waiting_per_user:
            raise RateLimited(
                f"too many turns waiting for a running slot: {waiting} waiting, "
                f"{running} of {new.max_running_per_user} running",
                code="too_many_waiting",
                retry_after=WAITING_RETRY_AFTER,
            )
    queued = sum(1 for t in active if t.status is TurnStatus.QUEUED)
    if queued >= new.max_queued_per_session:
        raise RateLimited(
            f"too many queued turns in this session: {queued} of {new.max_queued_per_session}"
        )

    now = clock()
    last_seq = (await conn.execute(_LAST_SEQ, {"session_id": new.session_id})).scalar_one()
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
        dispatched=dispatch,
        cancel_requested=False,
        created_at=now,
    )
    await conn.execute(
        _INSERT_TURN,
        {
            "id": turn.id,
            "session_id": turn.session_id,
            "user_id": turn.user_id,
            "seq": turn.seq,
            "status": turn.status.value,
            "attempt": 0,
            "model": turn.model,
            "user_message_id": turn.user_message_id,
            "assistant_message_id": turn.assistant_message_id,
            "client_message_id": turn.client_message_id,
            "dispatched": turn.dispatched,
            "dispatched_at": now if turn.dispatched else None,
            "cancel_requested": False,
            "created_at": now,
            "webhook_url": new.webhook_url,
            "steer": new.multitask is Multitask.STEER,
        },
    )
    await conn.execute(
        _INSERT_MESSAGE,
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
    values: dict[str, Any] = {"p_session_id": new.session_id, "updated_at": now}
    if new.regenerate and await supersede(conn, new, turn.id):
        values["cli_session_id"] = None  # the CLI's transcript holds the old answer
    if session.title is None:
        values["title"] = title_from(new.text)
    await conn.execute(_UPDATE_SESSION, values)  # SET: the keys of ``values`` but the id
    return SubmitResult(turn, created=True, earlier_active=active)


async def dispatch_next(
    conn: AsyncConnection,
    session_id: str,
    clock: Callable[[], datetime],
    *,
    republish_before: datetime | None = None,
    max_running_per_user: int | None = None,
) -> TurnRecord | None:
    """The next turn to publish, marked dispatched: the session's next queued turn
    if none is in flight, or with ``max_running_per_user`` the oldest turn waiting
    in the session owner's FIFO (any of their sessions) when the owner has a free
    running slot. With ``republish_before``, an in-flight head of this session
    that is still queued and whose publish was never confirmed (dispatched before
    that time) is returned again: its publisher died or failed before the broker
    confirmed it."""
    owner = (await conn.execute(_OWNER, {"session_id": session_id})).scalar_one_or_none()
    if owner is None:
        return None
    if max_running_per_user is not None:
        await lock_user(conn, owner)
    await conn.execute(_LOCK_SESSION, {"session_id": session_id})
    in_flight = (await conn.execute(_IN_FLIGHT, {"session_id": session_id})).first()
    if in_flight is not None:
        since = in_flight.dispatched_at or in_flight.created_at
        if (
            republish_before is not None
            and in_flight.status == TurnStatus.QUEUED.value
            and in_flight.published_at is None
            and since < republish_before
        ):
            return turn_record(in_flight._mapping)
        if max_running_per_user is None:
            return None
    if max_running_per_user is None:
        heads = (await conn.execute(_SESSION_HEADS, {"session_id": session_id})).all()
    else:
        if await count_running_for_user(conn, owner) >= max_running_per_user:
            return None
        heads = (await conn.execute(_USER_HEADS, {"user_id": owner})).all()
    # Oldest first; the guard on the UPDATE skips a head cancelled meanwhile
    # (a cancel of a queued turn holds only its session's lock).
    for row in heads:
        if row.session_id != session_id:
            await conn.execute(_LOCK_SESSION, {"session_id": row.session_id})
        result = await conn.execute(_ADMIT, {"turn_id": row.id, "dispatched_at": clock()})
        if result.rowcount == 1:
            return dataclasses.replace(turn_record(row._mapping), dispatched=True)
    return None


async def finish(
    conn: AsyncConnection,
    turn_id: str,
    attempt: int,
    outcome: TurnOutcome,
    clock: Callable[[], datetime],
) -> bool:
    """Record ``outcome`` if ``attempt`` still holds the turn: the terminal CAS."""
    row = (await conn.execute(_FINISH_READ, {"p_turn_id": turn_id})).first()
    if row is None:
        return False
    # Session before turn: the lock order dispatch_next uses.
    await conn.execute(_LOCK_SESSION, {"session_id": row.session_id})
    now = clock()
    result = await conn.execute(
        _FINISH_CAS,
        {
            "p_turn_id": turn_id,
            "p_attempt": attempt,
            "p_status": outcome.status.value,
            "p_error": outcome.error,
            "p_usage": outcome.usage,
            "p_finished_at": now,
        },
    )
    if result.rowcount != 1:
        return False
    await conn.execute(
        _FINISH_MESSAGE,
        {
            "p_message_id": row.assistant_message_id,
            "p_content": outcome.content,
            "p_parts": list(outcome.parts),
        },
    )
    await conn.execute(_TOUCH_SESSION, {"p_session_id": row.session_id, "p_updated_at": now})
    if row.webhook_url:
        await conn.execute(
            sa.insert(webhook_deliveries).values(
                id=new_id(),
                turn_id=turn_id,
                session_id=row.session_id,
                url=row.webhook_url,
                payload=turn_end_payload(turn_id, row.session_id, row.user_id, outcome, now),
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    return True


def turn_end_payload(
    turn_id: str, session_id: str, user_id: str, outcome: TurnOutcome, now: datetime
) -> dict[str, Any]:
    """The webhook body, in the Standard Webhooks shape ``{type, timestamp, data}``."""
    return {
        "type": f"turn.{outcome.status.value}",
        "timestamp": now.isoformat(),
        "data": {
            "turn_id": turn_id,
            "session_id": session_id,
            "user_id": user_id,
            "status": outcome.status.value,
            "text": outcome.content,
            "error": outcome.error,
            "usage": outcome.usage,
            "finished_at": now.isoformat(),
        },
    }


async def lock_session(conn: AsyncConnection, session_id: str, user_id: str) -> SessionRecord:
    """Read (and on PostgreSQL lock) the user's session; ``SessionNotFound`` if not theirs."""
    row = (await conn.execute(_SESSION_FOR_UPDATE, {"session_id": session_id})).first()
    if row is None or row.user_id != user_id:
        raise SessionNotFound(f"session {session_id} not found")
    return session_record(row._mapping)


async def active_turns(
    conn: AsyncConnection, session_id: str, *, before_seq: int | None = None
) -> list[TurnRecord]:
    if before_seq is None:
        rows = await conn.execute(_ACTIVE_OF, {"session_id": session_id})
    else:
        rows = await conn.execute(
            _ACTIVE_OF.where(turns.c.seq < before_seq), {"session_id": session_id}
        )
    return [turn_record(r._mapping) for r in rows.all()]


async def supersede(conn: AsyncConnection, new: NewTurn, by: str) -> bool:
    """Mark the turn a regenerate answers again (the one whose assistant message is
    ``new.replaces_message_id``, else the session's latest), and every later turn
    of the session, superseded by ``by``. False when there was none."""
    live = sa.and_(
        turns.c.session_id == new.session_id,
        turns.c.superseded_by.is_(None),
        turns.c.id != by,
    )
    target = sa.select(turns.c.seq).where(live)
    if new.replaces_message_id is not None:
        target = target.where(turns.c.assistant_message_id == new.replaces_message_id)
    else:
        target = target.order_by(turns.c.seq.desc()).limit(1)
    seq = (await conn.execute(target)).scalar_one_or_none()
    if seq is None:
        return False
    await conn.execute(sa.update(turns).where(live, turns.c.seq >= seq).values(superseded_by=by))
    return True


async def lock_user(conn: AsyncConnection, user_id: str) -> None:
    """Serialise the user's admissions (their running slots span sessions, which
    session locks do not): a transaction lock on PostgreSQL; SQLite's writer
    already holds the database's write lock."""
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(user_id))))


def waiting_heads() -> sa.Select[Any]:
    """Queued turns not yet dispatched with no earlier active turn in their
    session: each is its session's next turn, waiting for a running slot."""
    earlier = turns.alias("earlier")
    blocked = (
        sa.select(earlier.c.id)
        .where(
            earlier.c.session_id == turns.c.session_id,
            earlier.c.status.in_(ACTIVE),
            earlier.c.seq < turns.c.seq,
        )
        .exists()
    )
    return turn_query().where(
        turns.c.status == TurnStatus.QUEUED.value, turns.c.dispatched == sa.false(), ~blocked
    )


# The hot statements of admission, built once (building a statement cost more
# than running it): executed with their parameters.
_OWNER = sa.select(sessions.c.user_id).where(sessions.c.id == sa.bindparam("session_id"))
_LOCK_SESSION = (
    sa.select(sessions.c.id).where(sessions.c.id == sa.bindparam("session_id")).with_for_update()
)
_IN_FLIGHT = (
    turn_query()
    .where(
        turns.c.session_id == sa.bindparam("session_id"),
        turns.c.dispatched == sa.true(),
        turns.c.status.in_(ACTIVE),
    )
    .limit(1)
)
_SESSION_FOR_UPDATE = (
    sa.select(sessions).where(sessions.c.id == sa.bindparam("session_id")).with_for_update()
)
_ACTIVE_OF = (
    turn_query()
    .where(turns.c.session_id == sa.bindparam("session_id"), turns.c.status.in_(ACTIVE))
    .order_by(turns.c.seq)
)
_LAST_SEQ = sa.select(sa.func.coalesce(sa.func.max(turns.c.seq), 0)).where(
    turns.c.session_id == sa.bindparam("session_id")
)
_INSERT_TURN = sa.insert(turns)
_INSERT_MESSAGE = sa.insert(messages)
_UPDATE_SESSION = sa.update(sessions).where(sessions.c.id == sa.bindparam("p_session_id"))
# Could ``dispatch_next`` of the session (parameter ``session_id``) admit
# anything? A superset, one indexed read: its owner has a queued turn not yet
# dispatched (a waiting head, or one behind its session's active turn), or the
# session has a dispatched head whose publish was never confirmed.
MAY_ADMIT = sa.select(sa.literal(1)).where(
    sa.or_(
        sa.exists().where(
            turns.c.user_id
            == sa.select(sessions.c.user_id)
            .where(sessions.c.id == sa.bindparam("session_id"))
            .scalar_subquery(),
            turns.c.status == TurnStatus.QUEUED.value,
            turns.c.dispatched == sa.false(),
        ),
        sa.exists().where(
            turns.c.status == TurnStatus.QUEUED.value,
            turns.c.session_id == sa.bindparam("session_id"),
            turns.c.dispatched == sa.true(),
            turns.c.published_at.is_(None),
        ),
    )
)
_OLDEST_FIRST = (turns.c.created_at, turns.c.id)
_SESSION_HEADS = (
    waiting_heads().where(turns.c.session_id == sa.bindparam("session_id")).order_by(*_OLDEST_FIRST)
)
_USER_HEADS = (
    waiting_heads().where(turns.c.user_id == sa.bindparam("user_id")).order_by(*_OLDEST_FIRST)
)
_ADMIT = (
    sa.update(turns)
    .where(
        turns.c.id == sa.bindparam("turn_id"),
        turns.c.status == TurnStatus.QUEUED.value,
        turns.c.dispatched == sa.false(),
    )
    .values(dispatched=True, dispatched_at=sa.bindparam("dispatched_at"))
)
_FINISH_READ = sa.select(
    turns.c.session_id, turns.c.user_id, turns.c.assistant_message_id, turns.c.webhook_url
).where(turns.c.id == sa.bindparam("p_turn_id"))
_FINISH_CAS = (
    sa.update(turns)
    .where(HELD_BY_ATTEMPT)
    .values(
        status=sa.bindparam("p_status"),
        error=sa.bindparam("p_error"),
        usage=sa.bindparam("p_usage"),
        finished_at=sa.bindparam("p_finished_at"),
    )
)
_FINISH_MESSAGE = (
    sa.update(messages)
    .where(messages.c.id == sa.bindparam("p_message_id"))
    .values(content=sa.bindparam("p_content"), parts=sa.bindparam("p_parts"))
)
_TOUCH_SESSION = (
    sa.update(sessions)
    .where(sessions.c.id == sa.bindparam("p_session_id"))
    .values(updated_at=sa.bindparam("p_updated_at"))
)
_COUNT_RUNNING = sa.select(sa.func.count()).where(
    turns.c.user_id == sa.bindparam("user_id"),
    turns.c.dispatched == sa.true(),
    turns.c.status.in_(ACTIVE),
)
_COUNT_WAITING = sa.select(sa.func.count()).select_from(
    waiting_heads().where(turns.c.user_id == sa.bindparam("user_id")).subquery()
)


async def count_running_for_user(conn: AsyncConnection, user_id: str) -> int:
    """The user's running slots in use: their dispatched turns still active (a
    session has at most one)."""
    return int((await conn.execute(_COUNT_RUNNING, {"user_id": user_id})).scalar_one())


async def count_waiting_for_user(conn: AsyncConnection, user_id: str) -> int:
    """The user's turns waiting in their FIFO for a running slot."""
    return int((await conn.execute(_COUNT_WAITING, {"user_id": user_id})).scalar_one())


async def queue_position(conn: AsyncConnection, turn: TurnRecord) -> int | None:
    """``turn``'s place in its user's FIFO (1 is next), ``None`` when it is not
    waiting for a running slot (dispatched, ended, or behind its own session's
    active turn)."""
    if turn.status is not TurnStatus.QUEUED or turn.dispatched:
        return None
    heads = waiting_heads().where(turns.c.user_id == turn.user_id).subquery()
    mine = (await conn.execute(sa.select(heads.c.id).where(heads.c.id == turn.id))).first()
    if mine is None:
        return None
    ahead = sa.or_(
        heads.c.created_at < turn.created_at,
        sa.and_(heads.c.created_at == turn.created_at, heads.c.id < turn.id),
    )
    count = (
        await conn.execute(sa.select(sa.func.count()).select_from(heads).where(ahead))
    ).scalar_one()
    return int(count) + 1
