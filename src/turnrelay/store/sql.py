"""``SqlChatStore``: the ChatStore on SQLAlchemy async, for SQLite and PostgreSQL.

One code path serves both dialects. The engine and error translation live in
``turnrelay.store.engine`` (including how SQLite serialises writers); the
contended submit, dispatch and finish transactions, and the PostgreSQL lock
order they follow, in ``turnrelay.store.submit``; rows become records in
``turnrelay.store.records``. Every method here opens its own read or write
transaction, and no driver or SQLAlchemy error leaves it untranslated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from turnrelay.errors import SessionNotFound, TurnNotFound
from turnrelay.store import submit
from turnrelay.store.base import (
    TERMINAL,
    MessageRecord,
    NewTurn,
    SessionRecord,
    SubmitResult,
    TurnOutcome,
    TurnRecord,
    TurnStatus,
)
from turnrelay.store.engine import WRITE_OPTION, create_engine, translate_errors
from turnrelay.store.records import (
    ACTIVE,
    message_record,
    new_id,
    session_record,
    turn_query,
    turn_record,
)
from turnrelay.store.tables import messages, sessions, turns


def utcnow() -> datetime:
    return datetime.now(UTC)


class SqlChatStore:
    """ChatStore on a ``sqlite+aiosqlite://`` or ``postgresql+asyncpg://`` URL.

    ``clock`` returns the current time as an aware UTC datetime (tests inject
    one to order timestamps). The schema must exist: run ``migrate`` first.
    """

    def __init__(self, url: str, *, clock: Callable[[], datetime] | None = None) -> None:
        self._url = url
        self._now = clock or utcnow
        self._engine: AsyncEngine | None = None
        self._write_engine: AsyncEngine | None = None

    async def startup(self) -> None:
        if self._engine is not None:
            return
        async with translate_errors():
            self._engine = create_engine(self._url)
        self._write_engine = self._engine.execution_options(**{WRITE_OPTION: True})

    async def shutdown(self) -> None:
        engine, self._engine, self._write_engine = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        if self._engine is None:
            raise RuntimeError("SqlChatStore used before startup()")
        async with translate_errors(), self._engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One writing transaction, committed on success; errors translated."""
        async with translate_errors(), self._begin() as conn:
            yield conn

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """One writing transaction; errors left untranslated (for retry logic)."""
        if self._write_engine is None:
            raise RuntimeError("SqlChatStore used before startup()")
        async with self._write_engine.begin() as conn:
            yield conn

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # sessions -------------------------------------------------------------------------

    async def create_session(self, user_id: str) -> SessionRecord:
        now = self._now()
        record = SessionRecord(
            id=new_id(), user_id=user_id, title=None, created_at=now, updated_at=now
        )
        async with self._write() as conn:
            await conn.execute(
                sa.insert(sessions).values(
                    id=record.id,
                    user_id=user_id,
                    title=None,
                    cli_session_id=None,
                    created_at=now,
                    updated_at=now,
                )
            )
        return record

    async def get_session(self, session_id: str, user_id: str) -> SessionRecord:
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(sessions).where(sessions.c.id == session_id))
            ).first()
        if row is None or row.user_id != user_id:
            raise SessionNotFound(f"session {session_id} not found")
        return session_record(row._mapping)

    async def list_sessions(
        self, user_id: str, *, limit: int, offset: int
    ) -> tuple[list[SessionRecord], int]:
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(sessions)
                    .where(sessions.c.user_id == user_id)
                    .order_by(sessions.c.updated_at.desc(), sessions.c.id.desc())
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            total = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(sessions)
                    .where(sessions.c.user_id == user_id)
                )
            ).scalar_one()
        return [session_record(r._mapping) for r in rows], int(total)

    async def delete_session(self, session_id: str, user_id: str) -> None:
        async with self._write() as conn:
            await submit.lock_session(conn, session_id, user_id)
            # Explicit, rather than relying on ON DELETE CASCADE being enforced
            # (SQLite enforces it only with a per-connection pragma).
            await conn.execute(sa.delete(messages).where(messages.c.session_id == session_id))
            await conn.execute(sa.delete(turns).where(turns.c.session_id == session_id))
            await conn.execute(sa.delete(sessions).where(sessions.c.id == session_id))

    async def set_cli_session(self, session_id: str, cli_session_id: str) -> None:
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(sessions)
                .where(sessions.c.id == session_id)
                .values(cli_session_id=cli_session_id)
            )
            if result.rowcount != 1:
                raise SessionNotFound(f"session {session_id} not found")

    async def messages(self, session_id: str) -> list[MessageRecord]:
        return await self._messages(session_id, before_seq=None)

    async def history(self, session_id: str, before_seq: int) -> list[MessageRecord]:
        return await self._messages(session_id, before_seq=before_seq)

    async def _messages(self, session_id: str, *, before_seq: int | None) -> list[MessageRecord]:
        query = (
            sa.select(*messages.c, turns.c.status)
            .join(turns, turns.c.id == messages.c.turn_id)
            .where(messages.c.session_id == session_id)
            .order_by(turns.c.seq, sa.case((messages.c.role == "user", 0), else_=1))
        )
        if before_seq is not None:
            query = query.where(turns.c.seq < before_seq, messages.c.content != "")
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [message_record(r._mapping) for r in rows]

    # turns ----------------------------------------------------------------------------

    async def submit_turn(self, new: NewTurn) -> SubmitResult:
        async with translate_errors():
            for attempt in range(3):
                try:
                    async with self._begin() as conn:
                        return await submit.submit(conn, new, self._now)
                except sa_exc.IntegrityError:
                    # A racing submit with the same client message id committed
                    # between our read and our insert: the retry reads its turn.
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    async def get_turn(self, turn_id: str) -> TurnRecord:
        async with self._read() as conn:
            row = (await conn.execute(turn_query().where(turns.c.id == turn_id))).first()
        if row is None:
            raise TurnNotFound(f"turn {turn_id} not found")
        return turn_record(row._mapping)

    async def active_turns(self, session_id: str) -> list[TurnRecord]:
        async with self._read() as conn:
            return await submit.active_turns(conn, session_id)

    async def dispatch_next(
        self, session_id: str, *, republish_before: datetime | None = None
    ) -> TurnRecord | None:
        async with self._write() as conn:
            return await submit.dispatch_next(
                conn, session_id, self._now, republish_before=republish_before
            )

    async def mark_published(self, turn_id: str) -> None:
        async with self._write() as conn:
            await conn.execute(
                sa.update(turns)
                .where(turns.c.id == turn_id, turns.c.published_at.is_(None))
                .values(published_at=self._now())
            )

    async def unpublished_heads(self, before: datetime, limit: int = 100) -> list[TurnRecord]:
        query = (
            turn_query()
            .where(
                turns.c.dispatched == sa.true(),
                turns.c.status == TurnStatus.QUEUED.value,
                turns.c.published_at.is_(None),
                sa.func.coalesce(turns.c.dispatched_at, turns.c.created_at) < before,
            )
            .order_by(turns.c.created_at, turns.c.id)
            .limit(limit)
        )
        async with self._read() as conn:
            return [turn_record(r._mapping) for r in (await conn.execute(query)).all()]

    async def undispatched_heads(self, limit: int = 100) -> list[TurnRecord]:
        other = turns.alias("other")
        in_flight = (
            sa.select(other.c.id)
            .where(
                other.c.session_id == turns.c.session_id,
                other.c.dispatched == sa.true(),
                other.c.status.in_(ACTIVE),
            )
            .exists()
        )
        earlier_queued = (
            sa.select(other.c.id)
            .where(
                other.c.session_id == turns.c.session_id,
                other.c.status == TurnStatus.QUEUED.value,
                other.c.seq < turns.c.seq,
            )
            .exists()
        )
        query = (
            turn_query()
            .where(turns.c.status == TurnStatus.QUEUED.value, ~in_flight, ~earlier_queued)
            .order_by(turns.c.created_at, turns.c.id)
            .limit(limit)
        )
        async with self._read() as conn:
            return [turn_record(r._mapping) for r in (await conn.execute(query)).all()]

    async def dispatched_active(
        self, limit: int = 500, *, running_only: bool = False
    ) -> list[TurnRecord]:
        statuses = (TurnStatus.RUNNING.value,) if running_only else ACTIVE
        query = (
            turn_query()
            .where(turns.c.dispatched == sa.true(), turns.c.status.in_(statuses))
            .order_by(turns.c.created_at, turns.c.id)
            .limit(limit)
        )
        async with self._read() as conn:
            return [turn_record(r._mapping) for r in (await conn.execute(query)).all()]

    async def start_turn(self, turn_id: str, attempt: int) -> TurnRecord | None:
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(turns)
                .where(
                    turns.c.id == turn_id,
                    turns.c.attempt == attempt,
                    turns.c.status.in_(ACTIVE),
                )
                .values(
                    status=TurnStatus.RUNNING.value,
                    attempt=turns.c.attempt + 1,
                    started_at=self._now(),
                )
            )
            if result.rowcount != 1:
                return None
            row = (await conn.execute(turn_query().where(turns.c.id == turn_id))).one()
            return turn_record(row._mapping)

    async def save_partial(
        self, turn_id: str, attempt: int, content: str, parts: Sequence[dict[str, Any]]
    ) -> bool:
        async with self._write() as conn:
            # Lock the turn row while checking the fence, so a concurrent
            # finish_turn (which updates that row first) cannot be overwritten.
            row = (
                await conn.execute(
                    sa.select(turns.c.assistant_message_id)
                    .where(
                        turns.c.id == turn_id,
                        turns.c.attempt == attempt,
                        turns.c.status == TurnStatus.RUNNING.value,
                    )
                    .with_for_update()
                )
            ).first()
            if row is None:
                return False
            await conn.execute(
                sa.update(messages)
                .where(messages.c.id == row.assistant_message_id)
                .values(content=content, parts=list(parts))
            )
            return True

    async def finish_turn(self, turn_id: str, attempt: int, outcome: TurnOutcome) -> bool:
        if outcome.status not in TERMINAL:
            raise ValueError(f"finish_turn needs a terminal status, got {outcome.status}")
        async with self._write() as conn:
            return await submit.finish(conn, turn_id, attempt, outcome, self._now)

    async def request_cancel(self, turn_id: str) -> TurnRecord:
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(turns).where(turns.c.id == turn_id).values(cancel_requested=True)
            )
            if result.rowcount != 1:
                raise TurnNotFound(f"turn {turn_id} not found")
            row = (await conn.execute(turn_query().where(turns.c.id == turn_id))).one()
            return turn_record(row._mapping)

    async def count_active_for_user(self, user_id: str) -> int:
        async with self._read() as conn:
            return await submit.count_active_for_user(conn, user_id)
