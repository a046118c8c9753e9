"""Tool approvals in SQL: pausing a turn, answering its requests, expiring them.

A turn pauses (``pause``) when its runtime holds tool calls back for the user:
the CAS on its running attempt stores the ``TurnPause``, counts the requests in
``turns.pending_approvals`` and checkpoints the assistant message. Each answer
(``answer``, the API) or expiry (``expire``, the sweeper) decides requests of
the current pause once; the transaction that decides the last one is the one
that answers ``resume``, so exactly one caller publishes the turn. All three
lock the session row, then update the turn: the lock order of submit,
dispatch and finish, and what serialises two answers racing on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from turnrelay.errors import (
    ApprovalAlreadyAnswered,
    ApprovalNotFound,
    TurnNotFound,
    TurnNotWaiting,
)
from turnrelay.store.base import (
    ApprovalAnswer,
    ApprovalRecord,
    Decision,
    NewApproval,
    TurnPause,
    TurnRecord,
    TurnStatus,
)
from turnrelay.store.records import PAUSE, approval_record, turn_query, turn_record
from turnrelay.store.tables import messages, sessions, tool_approvals, turns

_LOCK_SESSION = (
    sa.select(sessions.c.id).where(sessions.c.id == sa.bindparam("session_id")).with_for_update()
)


async def _turn(conn: AsyncConnection, turn_id: str) -> TurnRecord:
    row = (await conn.execute(turn_query().where(turns.c.id == turn_id))).first()
    if row is None:
        raise TurnNotFound(f"turn {turn_id!r} not found")
    return turn_record(row._mapping)


async def _locked_turn(conn: AsyncConnection, turn_id: str) -> TurnRecord:
    turn = await _turn(conn, turn_id)
    await conn.execute(_LOCK_SESSION, {"session_id": turn.session_id})
    return await _turn(conn, turn_id)  # as it stands under the lock


async def pause(
    conn: AsyncConnection,
    turn_id: str,
    attempt: int,
    paused: TurnPause,
    approvals: Sequence[NewApproval],
    expires_at: datetime,
    now: datetime,
) -> bool:
    try:
        turn = await _locked_turn(conn, turn_id)
    except TurnNotFound:
        return False
    if (
        turn.status is not TurnStatus.RUNNING
        or turn.attempt != attempt
        or turn.cancel_requested
        or not approvals
    ):
        return False
    await conn.execute(
        sa.update(turns)
        .where(turns.c.id == turn_id)
        .values(paused=PAUSE.dump_python(paused, mode="json"), pending_approvals=len(approvals))
    )
    await conn.execute(
        sa.insert(tool_approvals),
        [
            {
                "id": a.id,
                "turn_id": turn_id,
                "call_id": a.call_id,
                "tool_name": a.tool_name,
                "input": a.input,
                # a microsecond apart: the calls' order is the requests' order
                "created_at": now + timedelta(microseconds=i),
                "expires_at": expires_at,
            }
            for i, a in enumerate(approvals)
        ],
    )
    await conn.execute(
        sa.update(messages)
        .where(messages.c.id == turn.assistant_message_id)
        .values(content=paused.content, parts=list(paused.parts))
    )
    return True


async def approvals_of(conn: AsyncConnection, turn_id: str) -> list[ApprovalRecord]:
    rows = await conn.execute(
        sa.select(tool_approvals)
        .where(tool_approvals.c.turn_id == turn_id)
        .order_by(tool_approvals.c.created_at, tool_approvals.c.id)
    )
    return [approval_record(r._mapping) for r in rows.all()]


def _of_pause(records: list[ApprovalRecord], turn: TurnRecord) -> list[ApprovalRecord]:
    ids = set(turn.paused.approval_ids) if turn.paused is not None else set()
    return [a for a in records if a.id in ids]


async def _decide(
    conn: AsyncConnection, turn: TurnRecord, decided: dict[str, Decision], now: datetime
) -> tuple[TurnRecord, bool]:
    """Record ``decided`` (all unanswered requests of the turn's pause); True
    when that leaves none unanswered."""
    for decision in decided.values():
        await conn.execute(
            sa.update(tool_approvals)
            .where(tool_approvals.c.id == decision.approval_id, tool_approvals.c.approved.is_(None))
            .values(approved=decision.approved, reason=decision.reason, decided_at=now)
        )
    left = max(0, turn.pending_approvals - len(decided))
    await conn.execute(sa.update(turns).where(turns.c.id == turn.id).values(pending_approvals=left))
    return await _turn(conn, turn.id), left == 0 and bool(decided)


async def answer(
    conn: AsyncConnection, turn_id: str, decisions: Sequence[Decision], now: datetime
) -> ApprovalAnswer:
    turn = await _locked_turn(conn, turn_id)
    if turn.paused is None:
        raise TurnNotWaiting(f"turn {turn_id} is not waiting for an approval")
    current = {a.id: a for a in _of_pause(await approvals_of(conn, turn_id), turn)}
    fresh: dict[str, Decision] = {}
    for decision in decisions:
        request = current.get(decision.approval_id)
        if request is None:
            raise ApprovalNotFound(
                f"turn {turn_id} has no approval request {decision.approval_id[:80]!r} waiting"
            )
        earlier = fresh.get(decision.approval_id)
        if request.approved is None and earlier is None:
            fresh[decision.approval_id] = decision
            continue
        settled = request.approved if earlier is None else earlier.approved
        if settled != decision.approved:
            why = f" ({request.reason})" if request.reason else ""
            raise ApprovalAlreadyAnswered(
                f"approval {decision.approval_id} was already "
                f"{'approved' if settled else 'denied'}{why}"
            )
    if fresh and not turn.waiting:
        # It ended (cancelled while it waited), or goes on already.
        raise TurnNotWaiting(f"turn {turn_id} is not waiting for an approval")
    resume = False
    if fresh:
        turn, resume = await _decide(conn, turn, fresh, now)
    return ApprovalAnswer(turn, _of_pause(await approvals_of(conn, turn_id), turn), resume)


async def expire(conn: AsyncConnection, now: datetime, reason: str, limit: int) -> list[TurnRecord]:
    due = await conn.execute(
        sa.select(tool_approvals.c.turn_id)
        .where(tool_approvals.c.approved.is_(None), tool_approvals.c.expires_at <= now)
        .group_by(tool_approvals.c.turn_id)
        .limit(limit)
    )
    resumed: list[TurnRecord] = []
    for (turn_id,) in due.all():
        try:
            turn = await _locked_turn(conn, turn_id)
        except TurnNotFound:
            continue
        open_ = [
            a
            for a in _of_pause(await approvals_of(conn, turn_id), turn)
            if a.approved is None and a.expires_at <= now
        ]
        if not turn.waiting or not open_:
            # A turn that ended (cancelled while it waited) or a stale request:
            # close the requests so they are not looked at again.
            await conn.execute(
                sa.update(tool_approvals)
                .where(
                    tool_approvals.c.turn_id == turn_id,
                    tool_approvals.c.approved.is_(None),
                    tool_approvals.c.expires_at <= now,
                )
                .values(approved=False, reason=reason, decided_at=now)
            )
            continue
        turn, resume = await _decide(
            conn, turn, {a.id: Decision(a.id, False, reason) for a in open_}, now
        )
        if resume:
            resumed.append(turn)
    return resumed
