"""Steering in SQL: a running turn takes the messages sent behind it with
``multitask: steer``.

A steering message is stored as a turn of its own (queued behind the running
one, as ``enqueue`` would), so if no model step takes it, it simply becomes
the session's next turn. A running attempt takes the ones still queued and
undispatched, under the session lock that ``dispatch_next`` also takes, so a
message is either taken into the running turn or dispatched as a turn, never
both: a taken one is ``completed`` with ``steered_into`` naming the turn that
took it and ``steered_step`` the model request it entered before. Every call
answers all the turn took so far, so a retried attempt (which starts over)
gets the earlier attempt's messages again, at the same steps: none is lost,
and the runtime, which inserts each once, delivers none twice.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from turnrelay.store.base import Steer, TurnStatus
from turnrelay.store.tables import messages, sessions, turns


def _takeable() -> sa.ColumnElement[bool]:
    return sa.and_(
        turns.c.status == TurnStatus.QUEUED.value,
        turns.c.dispatched == sa.false(),
        turns.c.superseded_by.is_(None),
    )


_TURN = sa.bindparam("turn_id", type_=sa.String)
_MINE = turns.alias("mine")

# One indexed read (parameter ``turn_id``, built once): has the turn a steering
# message to take, or taken one before? Almost every model request of almost
# every turn has none, and then ``take``'s write transaction (and its session
# lock) is not needed. A steer is queued behind the running turn in its session,
# so this looks there, on the ``(session_id, seq)`` index, not at every turn.
ANY_FOR = (
    sa.select(turns.c.id)
    .where(
        turns.c.session_id
        == sa.select(_MINE.c.session_id).where(_MINE.c.id == _TURN).scalar_subquery(),
        turns.c.seq > sa.select(_MINE.c.seq).where(_MINE.c.id == _TURN).scalar_subquery(),
        turns.c.steer == sa.true(),
        sa.or_(turns.c.steered_into == _TURN, _takeable()),
    )
    .limit(1)
)


async def take(
    conn: AsyncConnection, turn_id: str, attempt: int, step: int, now: datetime
) -> list[Steer]:
    row = (
        await conn.execute(sa.select(turns.c.session_id, turns.c.seq).where(turns.c.id == turn_id))
    ).first()
    if row is None:
        return []
    await conn.execute(
        sa.select(sessions.c.id).where(sessions.c.id == row.session_id).with_for_update()
    )
    holder = (
        await conn.execute(
            sa.select(turns.c.id).where(
                turns.c.id == turn_id,
                turns.c.attempt == attempt,
                turns.c.status == TurnStatus.RUNNING.value,
            )
        )
    ).first()
    if holder is None:
        return []
    await conn.execute(
        sa.update(turns)
        .where(
            turns.c.session_id == row.session_id,
            turns.c.seq > row.seq,
            turns.c.steer == sa.true(),
            _takeable(),
        )
        .values(
            status=TurnStatus.COMPLETED.value,
            steered_into=turn_id,
            steered_step=step,
            started_at=now,
            finished_at=now,
        )
    )
    taken = await conn.execute(
        sa.select(turns.c.id, turns.c.user_message_id, turns.c.steered_step, messages.c.content)
        .join(messages, messages.c.id == turns.c.user_message_id)
        .where(
            turns.c.session_id == row.session_id,
            turns.c.seq > row.seq,
            turns.c.steered_into == turn_id,
        )
        .order_by(turns.c.seq)
    )
    return [Steer(r.id, r.user_message_id, r.content, r.steered_step) for r in taken.all()]
