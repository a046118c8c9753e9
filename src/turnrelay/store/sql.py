"""``SqlChatStore``: the ChatStore on SQLAlchemy async, for SQLite and PostgreSQL.

One code path serves both dialects. The engine and error translation live in
``turnrelay.store.engine`` (including how SQLite serialises writers); the
contended submit, dispatch and finish transactions, and the PostgreSQL lock
order they follow, in ``turnrelay.store.submit``; rows become records in
``turnrelay.store.records``. Every method here opens its own read or write
transaction, and no driver or SQLAlchemy error leaves it untranslated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from turnrelay.errors import SessionNotFound, TurnNotFound
from turnrelay.store import approvals as approval_sql
from turnrelay.store import steering, submit
from turnrelay.store.base import (
    TERMINAL,
    ApprovalAnswer,
    ApprovalRecord,
    Decision,
    MessageRecord,
    NewApproval,
    NewTurn,
    SessionRecord,
    Steer,
    SubmitResult,
    TurnOutcome,
    TurnPause,
    TurnRecord,
    TurnStatus,
    WebhookDelivery,
)
from turnrelay.store.engine import (
    WRITE_OPTION,
    create_engine,
    sqlite_database,
    translate_errors,
)
from turnrelay.store.inline_sqlite import lock_key, writer_lock
from turnrelay.store.records import (
    ACTIVE,
    BOOL,
    HELD_BY_ATTEMPT,
    NOTHING,
    STEERS,
    TURN_BY_ID,
    TURN_OR_NONE,
    TURNS,
    WEBHOOKS,
    message_record,
    new_id,
    session_record,
    turn_query,
    turn_record,
    webhook_record,
)
from turnrelay.store.tables import messages, sessions, store_calls, turns, webhook_deliveries

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


# A session's messages (and a turn's history: the earlier ones, non-empty),
# built once: building the statement cost more than running it.
_SESSION_MESSAGES = (
    sa.select(*messages.c, turns.c.status)
    .join(turns, turns.c.id == messages.c.turn_id)
    .where(
        messages.c.session_id == sa.bindparam("session_id"),
        turns.c.superseded_by.is_(None),
        # a steering message is a user entry only: the turn that took it answers
        sa.or_(messages.c.role == "user", turns.c.steered_into.is_(None)),
    )
    .order_by(turns.c.seq, sa.case((messages.c.role == "user", 0), else_=1))
)
_HISTORY = _SESSION_MESSAGES.where(
    turns.c.seq < sa.bindparam("before_seq"), messages.c.content != ""
)
_INSERT_SESSION = sa.insert(sessions)
# The executor's start and the API's publish mark of every turn.
_START = (
    sa.update(turns)
    .where(HELD_BY_ATTEMPT)
    .values(
        status=TurnStatus.RUNNING.value,
        attempt=turns.c.attempt + 1,
        started_at=sa.bindparam("p_now"),
    )
)
_PUBLISHED = (
    sa.update(turns)
    .where(turns.c.id == sa.bindparam("p_turn_id"), turns.c.published_at.is_(None))
    .values(published_at=sa.bindparam("p_now"))
)


class SqlChatStore:
    """ChatStore on a ``sqlite+aiosqlite://`` or ``postgresql+asyncpg://`` URL.

    ``clock`` returns the current time as an aware UTC datetime (tests inject
    one to order timestamps). The schema must exist: run ``migrate`` first.
    ``pool_size`` bounds PostgreSQL connections (SQLAlchemy's default otherwise).

    The executor's writes take an optional ``call_id``: a caller that may send
    one write twice (the db-manager's clients) names it, and the store records
    the answer in the write's own transaction, so the repeat answers the same
    (a finish that won answers "won") without running the write again.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] | None = None,
        pool_size: int | None = None,
    ) -> None:
        self._url = url
        self._now = clock or utcnow
        self._pool_size = pool_size
        self._engine: AsyncEngine | None = None
        self._write_engine: AsyncEngine | None = None
        database = sqlite_database(url)
        # SQLite only: the key of its writers' lock (a path resolved once, not
        # on every write).
        self._sqlite = lock_key(database) if database is not None else None

    async def startup(self) -> None:
        if self._engine is not None:
            return
        async with translate_errors():
            self._engine = create_engine(self._url, pool_size=self._pool_size)
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
        if self._sqlite is None:
            async with self._write_engine.begin() as conn:
                yield conn
            return
        # SQLite runs on the loop's thread: this process's writers take turns
        # here, never inside SQLite's busy wait (``inline_sqlite``).
        async with writer_lock(self._sqlite), self._write_engine.begin() as conn:
            yield conn

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def _once(
        self,
        call_id: str | None,
        method: str,
        codec: TypeAdapter[T],
        write: Callable[[AsyncConnection], Awaitable[T]],
    ) -> T:
        """Run ``write`` in one writing transaction; with a ``call_id``, at most
        once: the answer is recorded beside the write, and a repeat of the call
        reads it back. Two copies of one call racing: the second's insert of
        the id fails on the key, and its retry reads the first's answer."""
        if call_id is None:
            async with self._write() as conn:
                return await write(conn)
        async with translate_errors():
            for attempt in range(3):
                try:
                    async with self._begin() as conn:
                        recorded = (
                            await conn.execute(
                                sa.select(store_calls.c.result).where(
                                    store_calls.c.call_id == call_id
                                )
                            )
                        ).first()
                        if recorded is not None:
                            return codec.validate_python(recorded.result)
                        result = await write(conn)
                        await conn.execute(
                            sa.insert(store_calls).values(
                                call_id=call_id,
                                method=method,
                                result=codec.dump_python(result, mode="json"),
                                created_at=self._now(),
                            )
                        )
                        return result
                except sa_exc.IntegrityError:
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    async def prune_calls(self, before: datetime) -> int:
        """Forget recorded calls made before ``before`` (no caller retries them)."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.delete(store_calls).where(store_calls.c.created_at < before)
            )
        return int(result.rowcount or 0)

    # sessions -------------------------------------------------------------------------

    async def create_session(self, user_id: str) -> SessionRecord:
        now = self._now()
        record = SessionRecord(
            id=new_id(), user_id=user_id, title=None, created_at=now, updated_at=now
        )
        async with self._write() as conn:
            await conn.execute(
                _INSERT_SESSION,
                {
                    "id": record.id,
                    "user_id": user_id,
                    "title": None,
                    "cli_session_id": None,
                    "created_at": now,
                    "updated_at": now,
                },
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
            await conn.execute(
                sa.delete(webhook_deliveries).where(webhook_deliveries.c.session_id == session_id)
            )
            await conn.execute(sa.delete(turns).where(turns.c.session_id == session_id))
            await conn.execute(sa.delete(sessions).where(sessions.c.id == session_id))

    async def set_cli_session(
        self, session_id: str, cli_session_id: str, *, call_id: str | None = None
    ) -> None:
        async def write(conn: AsyncConnection) -> None:
            result = await conn.execute(
                sa.update(sessions)
                .where(sessions.c.id == session_id)
                .values(cli_session_id=cli_session_id)
            )
            if result.rowcount != 1:
                raise SessionNotFound(f"session {session_id} not found")

        await self._once(call_id, "set_cli_session", NOTHING, write)

    async def cli_session(self, session_id: str) -> str | None:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(sessions.c.cli_session_id).where(sessions.c.id == session_id)
                )
            ).first()
        if row is None:
            raise SessionNotFound(f"session {session_id} not found")
        return row.cli_session_id  # type: ignore[no-any-return]

    async def messages(self, session_id: str) -> list[MessageRecord]:
        return await self._messages(session_id, before_seq=None)

    async def history(self, session_id: str, before_seq: int) -> list[MessageRecord]:
        return await self._messages(session_id, before_seq=before_seq)

    async def _messages(self, session_id: str, *, before_seq: int | None) -> list[MessageRecord]:
        async with self._read() as conn:
            if before_seq is None:
                result = await conn.execute(_SESSION_MESSAGES, {"session_id": session_id})
            else:
                result = await conn.execute(
                    _HISTORY, {"session_id": session_id, "before_seq": before_seq}
                )
            rows = result.all()
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
            row = (await conn.execute(TURN_BY_ID, {"turn_id": turn_id})).first()
        if row is None:
            raise TurnNotFound(f"turn {turn_id} not found")
        return turn_record(row._mapping)

    async def active_turns(self, session_id: str) -> list[TurnRecord]:
        async with self._read() as conn:
            return await submit.active_turns(conn, session_id)

    async def dispatch_next(
        self,
        session_id: str,
        *,
        republish_before: datetime | None = None,
        max_running_per_user: int | None = None,
        call_id: str | None = None,
    ) -> TurnRecord | None:
        async def write(conn: AsyncConnection) -> TurnRecord | None:
            return await submit.dispatch_next(
                conn,
                session_id,
                self._now,
                republish_before=republish_before,
                max_running_per_user=max_running_per_user,
            )

        if self._sqlite is not None:
            # SQLite runs one writer at a time, so a read now sees every submit
            # that found this user's slots full (it committed before the write
            # that freed one) and every unconfirmed head of the session; a
            # submit after that write found the slot free and took it. Nothing
            # there, nothing to admit: the common case (every finish asks) is
            # then one read, not a write transaction. On PostgreSQL a submit
            # can be mid-transaction now, so the write path, which waits for
            # its user lock, always runs.
            async with self._read() as conn:
                found = await conn.execute(submit.MAY_ADMIT, {"session_id": session_id})
                if found.first() is None:
                    return None

        return await self._once(call_id, "dispatch_next", TURN_OR_NONE, write)

    async def mark_published(self, turn_id: str, *, call_id: str | None = None) -> None:
        async def write(conn: AsyncConnection) -> None:
            await conn.execute(_PUBLISHED, {"p_turn_id": turn_id, "p_now": self._now()})

        await self._once(call_id, "mark_published", NOTHING, write)

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

    async def start_turn(
        self, turn_id: str, attempt: int, *, call_id: str | None = None
    ) -> TurnRecord | None:
        async def write(conn: AsyncConnection) -> TurnRecord | None:
            result = await conn.execute(
                _START, {"p_turn_id": turn_id, "p_attempt": attempt, "p_now": self._now()}
            )
            if result.rowcount != 1:
                return None
            row = (await conn.execute(TURN_BY_ID, {"turn_id": turn_id})).one()
            return turn_record(row._mapping)

        return await self._once(call_id, "start_turn", TURN_OR_NONE, write)

    async def save_partial(
        self,
        turn_id: str,
        attempt: int,
        content: str,
        parts: Sequence[dict[str, Any]],
        *,
        call_id: str | None = None,
    ) -> bool:
        async def write(conn: AsyncConnection) -> bool:
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

        return await self._once(call_id, "save_partial", BOOL, write)

    async def finish_turn(
        self, turn_id: str, attempt: int, outcome: TurnOutcome, *, call_id: str | None = None
    ) -> bool:
        if outcome.status not in TERMINAL:
            raise ValueError(f"finish_turn needs a terminal status, got {outcome.status}")

        async def write(conn: AsyncConnection) -> bool:
            return await submit.finish(conn, turn_id, attempt, outcome, self._now)

        return await self._once(call_id, "finish_turn", BOOL, write)

    # tool approvals -------------------------------------------------------------------------

    async def pause_turn(
        self,
        turn_id: str,
        attempt: int,
        pause: TurnPause,
        approvals: Sequence[NewApproval],
        expires_at: datetime,
        *,
        call_id: str | None = None,
    ) -> bool:
        async def write(conn: AsyncConnection) -> bool:
            return await approval_sql.pause(
                conn, turn_id, attempt, pause, approvals, expires_at, self._now()
            )

        return await self._once(call_id, "pause_turn", BOOL, write)

    async def take_steers(
        self, turn_id: str, attempt: int, step: int, *, call_id: str | None = None
    ) -> list[Steer]:
        async def write(conn: AsyncConnection) -> list[Steer]:
            return await steering.take(conn, turn_id, attempt, step, self._now())

        async with self._read() as conn:
            if (await conn.execute(steering.ANY_FOR, {"turn_id": turn_id})).first() is None:
                return []  # nothing to take: no write transaction, no session lock
        return await self._once(call_id, "take_steers", STEERS, write)

    async def approvals(self, turn_id: str) -> list[ApprovalRecord]:
        async with self._read() as conn:
            return await approval_sql.approvals_of(conn, turn_id)

    async def expire_approvals(
        self, now: datetime, reason: str, limit: int = 100, *, call_id: str | None = None
    ) -> list[TurnRecord]:
        async def write(conn: AsyncConnection) -> list[TurnRecord]:
            return await approval_sql.expire(conn, now, reason, limit)

        return await self._once(call_id, "expire_approvals", TURNS, write)

    async def turn_for_message(self, session_id: str, assistant_message_id: str) -> TurnRecord:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    turn_query().where(
                        turns.c.session_id == session_id,
                        turns.c.assistant_message_id == assistant_message_id,
                    )
                )
            ).first()
        if row is None:
            raise TurnNotFound(f"no turn answers with message {assistant_message_id[:128]!r}")
        return turn_record(row._mapping)

    async def answer_approvals(self, turn_id: str, decisions: Sequence[Decision]) -> ApprovalAnswer:
        async with self._write() as conn:
            return await approval_sql.answer(conn, turn_id, decisions, self._now())

    # the webhook outbox -------------------------------------------------------------------

    async def claim_webhooks(
        self, limit: int, lease: float, *, call_id: str | None = None
    ) -> list[WebhookDelivery]:
        async def write(conn: AsyncConnection) -> list[WebhookDelivery]:
            now = self._now()
            due = (
                sa.select(webhook_deliveries.c.id)
                .where(
                    webhook_deliveries.c.status == "pending",
                    webhook_deliveries.c.next_attempt_at <= now,
                )
                .order_by(webhook_deliveries.c.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            rows = (
                await conn.execute(
                    sa.update(webhook_deliveries)
                    .where(webhook_deliveries.c.id.in_(due.scalar_subquery()))
                    .values(
                        attempts=webhook_deliveries.c.attempts + 1,
                        next_attempt_at=now + timedelta(seconds=lease),
                    )
                    .returning(*webhook_deliveries.c)
                )
            ).all()
            return sorted((webhook_record(r._mapping) for r in rows), key=lambda d: d.created_at)

        return await self._once(call_id, "claim_webhooks", WEBHOOKS, write)

    async def settle_webhook(
        self,
        delivery_id: str,
        attempt: int,
        *,
        delivered: bool,
        status_code: int | None,
        error: str | None,
        retry_in: float | None,
        call_id: str | None = None,
    ) -> None:
        async def write(conn: AsyncConnection) -> None:
            now = self._now()
            values: dict[str, Any] = {"last_status": status_code, "last_error": error}
            if delivered:
                values.update(status="delivered", delivered_at=now, last_error=None)
            elif retry_in is None:
                values["status"] = "failed"
            else:
                values["next_attempt_at"] = now + timedelta(seconds=retry_in)
            await conn.execute(
                sa.update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.id == delivery_id,
                    webhook_deliveries.c.attempts == attempt,
                    webhook_deliveries.c.status == "pending",
                )
                .values(**values)
            )

        await self._once(call_id, "settle_webhook", NOTHING, write)

    async def webhook_deliveries(self, turn_id: str) -> list[WebhookDelivery]:
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(webhook_deliveries)
                    .where(webhook_deliveries.c.turn_id == turn_id)
                    .order_by(webhook_deliveries.c.created_at, webhook_deliveries.c.id)
                )
            ).all()
        return [webhook_record(r._mapping) for r in rows]

    async def request_cancel(self, turn_id: str) -> TurnRecord:
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(turns).where(turns.c.id == turn_id).values(cancel_requested=True)
            )
            if result.rowcount != 1:
                raise TurnNotFound(f"turn {turn_id} not found")
            row = (await conn.execute(turn_query().where(turns.c.id == turn_id))).one()
            return turn_record(row._mapping)

    async def count_running_for_user(self, user_id: str) -> int:
        async with self._read() as conn:
            return await submit.count_running_for_user(conn, user_id)

    async def oldest_waiting(self, user_id: str) -> TurnRecord | None:
        query = (
            submit.waiting_heads()
            .where(turns.c.user_id == user_id)
            .order_by(turns.c.created_at, turns.c.id)
            .limit(1)
        )
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else turn_record(row._mapping)

    async def queue_position(self, turn: TurnRecord) -> int | None:
        async with self._read() as conn:
            return await submit.queue_position(conn, turn)
