"""``SqlChatStore``: the ChatStore on SQLAlchemy async, for SQLite and PostgreSQL.

One code path serves both dialects; where they differ is how concurrent writers
are serialised:

* **PostgreSQL** (asyncpg, READ COMMITTED): a submit or a dispatch locks its
  session row (``SELECT … FOR UPDATE``) first, so a session's submits and
  dispatches run one at a time; the terminal CAS is a single guarded ``UPDATE``,
  which PostgreSQL re-evaluates after waiting on the row, so exactly one writer
  matches. Locks are always taken session → turn → message, so these paths
  cannot deadlock one another.
* **SQLite** (aiosqlite): every writing transaction starts with ``BEGIN
  IMMEDIATE``, taking the database's single write lock up front; a deferred
  transaction that later tries to write fails at once with "database is locked"
  when another connection wrote meanwhile, whatever the busy timeout. Reads stay
  deferred and, in WAL mode, never wait for writers.

Driver and SQLAlchemy errors never leave this module: ``translate_errors`` turns
them into ``BackendUnavailable`` (cannot reach or use the database),
``SchemaOutOfDate`` (tables missing) or a plain ``TurnrelayError``.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import RowMapping, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from turnrelay.errors import (
    BackendUnavailable,
    MessageIdConflict,
    RateLimited,
    SchemaOutOfDate,
    SessionNotFound,
    TurnAlreadyActive,
    TurnNotFound,
    TurnrelayError,
)
from turnrelay.store.base import (
    TERMINAL,
    MessageRecord,
    Multitask,
    NewTurn,
    SessionRecord,
    SubmitResult,
    TurnOutcome,
    TurnRecord,
    TurnStatus,
)
from turnrelay.store.tables import messages, sessions, turns

# How long a SQLite writer waits for another connection's write lock before
# failing. Writes here are short single transactions; a long wait only happens
# under a burst, and failing the request then is worse than waiting.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# How long connecting to PostgreSQL may take before the store reports it
# unavailable (asyncpg's own default is 60 s, longer than any HTTP client waits).
POSTGRES_CONNECT_TIMEOUT_S = 10.0
TITLE_MAX_CHARS = 80

_WRITE_OPTION = "turnrelay_write"
_ACTIVE = (TurnStatus.QUEUED.value, TurnStatus.RUNNING.value)
# SQLSTATE undefined_table: the schema was never migrated.
_PG_UNDEFINED_TABLE = "42P01"
# SQLSTATE classes meaning "cannot use this server now": connection exception,
# bad credentials, unknown database, out of resources, shutting down.
_PG_UNAVAILABLE_PREFIXES = ("08", "28", "3D", "53", "57P")


def utcnow() -> datetime:
    return datetime.now(UTC)


# errors -----------------------------------------------------------------------------


def _translate(exc: BaseException) -> TurnrelayError | None:
    if isinstance(exc, sa_exc.DBAPIError):
        orig = exc.orig
        text = str(orig)
        pgcode = str(getattr(orig, "pgcode", None) or "")
        if pgcode == _PG_UNDEFINED_TABLE or "no such table" in text:
            return SchemaOutOfDate("database schema is missing its tables: run `turnrelay migrate`")
        if (
            isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
            or exc.connection_invalidated
            or pgcode.startswith(_PG_UNAVAILABLE_PREFIXES)
        ):
            return BackendUnavailable(f"database unavailable: {text}")
        return TurnrelayError(f"database error: {type(orig).__name__}: {text}")
    if isinstance(exc, sa_exc.TimeoutError | OSError | asyncpg.PostgresError):
        # Pool exhausted, connection refused or timed out, server refused the
        # connection (unknown database, too many clients).
        return BackendUnavailable(f"database unavailable: {exc}")
    if isinstance(exc, asyncpg.InterfaceError):
        return BackendUnavailable(f"database unavailable: {exc}")
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return TurnrelayError(f"database error: {exc}")
    return None


@asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Re-raise SQLAlchemy and driver errors as turnrelay errors."""
    try:
        yield
    except TurnrelayError:
        raise
    except Exception as exc:
        translated = _translate(exc)
        if translated is None:
            raise
        raise translated from exc


# engine -----------------------------------------------------------------------------


def create_engine(url: str) -> AsyncEngine:
    """An engine for ``url``, configured for the store's concurrency (see module doc).

    Connects lazily, but creates the parent directory of a SQLite file.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed)
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        parsed,
        pool_pre_ping=True,
        connect_args={"timeout": POSTGRES_CONNECT_TIMEOUT_S},
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN (below) instead of the sqlite3 module.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL syncs at checkpoints, not at every commit: a power
        # loss may drop the last commits but never corrupts the database, and a
        # turn's three small commits stop costing three fsyncs on its hot path.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


# records ----------------------------------------------------------------------------

_user_message = messages.alias("user_message")


def _turn_query() -> sa.Select[Any]:
    return sa.select(*turns.c, _user_message.c.content.label("user_text")).join(
        _user_message, _user_message.c.id == turns.c.user_message_id
    )


def _turn(m: RowMapping) -> TurnRecord:
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


def _session(m: RowMapping) -> SessionRecord:
    return SessionRecord(
        id=m["id"],
        user_id=m["user_id"],
        title=m["title"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        cli_session_id=m["cli_session_id"],
    )


def _message(m: RowMapping) -> MessageRecord:
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


def title_from(text: str) -> str | None:
    """The session title a first message gives: its first non-blank line, shortened."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:TITLE_MAX_CHARS]
    return None


def _new_id() -> str:
    return str(uuid.uuid4())


# the store --------------------------------------------------------------------------


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
        self._write_engine = self._engine.execution_options(**{_WRITE_OPTION: True})

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
            id=_new_id(), user_id=user_id, title=None, created_at=now, updated_at=now
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
        return _session(row._mapping)

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
        return [_session(r._mapping) for r in rows], int(total)

    async def delete_session(self, session_id: str, user_id: str) -> None:
        async with self._write() as conn:
            await self._lock_session(conn, session_id, user_id)
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
        return [_message(r._mapping) for r in rows]

    # turns ----------------------------------------------------------------------------

    async def submit_turn(self, new: NewTurn) -> SubmitResult:
        async with translate_errors():
            for attempt in range(3):
                try:
                    async with self._begin() as conn:
                        return await self._submit(conn, new)
                except sa_exc.IntegrityError:
                    # A racing submit with the same client message id committed
                    # between our read and our insert: the retry reads its turn.
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    async def _submit(self, conn: AsyncConnection, new: NewTurn) -> SubmitResult:
        session = await self._lock_session(conn, new.session_id, new.user_id)
        if new.client_message_id is not None:
            row = (
                await conn.execute(
                    _turn_query().where(
                        turns.c.session_id == new.session_id,
                        turns.c.client_message_id == new.client_message_id,
                    )
                )
            ).first()
            if row is not None:
                existing = _turn(row._mapping)
                if existing.user_text != new.text:
                    raise MessageIdConflict(
                        f"message_id {new.client_message_id} was already used "
                        "for a different message"
                    )
                earlier = await self._active(conn, new.session_id, before_seq=existing.seq)
                return SubmitResult(existing, created=False, earlier_active=earlier)

        active = await self._active(conn, new.session_id)
        if active and new.multitask is Multitask.REJECT:
            raise TurnAlreadyActive("the session already has an active turn", turn_id=active[0].id)
        if not active:
            # The per-user cap spans sessions, which the session lock does not
            # serialise: on PostgreSQL take a per-user transaction lock too.
            if conn.dialect.name == "postgresql":
                await conn.execute(
                    sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(new.user_id)))
                )
            running = await self._count_active_for_user(conn, new.user_id)
            if running >= new.max_running_per_user:
                raise RateLimited(
                    f"too many running turns: {running} of {new.max_running_per_user}"
                )
        queued = sum(1 for t in active if t.status is TurnStatus.QUEUED)
        if queued >= new.max_queued_per_session:
            raise RateLimited(
                f"too many queued turns in this session: {queued} of {new.max_queued_per_session}"
            )

        now = self._now()
        last_seq = (
            await conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(turns.c.seq), 0)).where(
                    turns.c.session_id == new.session_id
                )
            )
        ).scalar_one()
        turn = TurnRecord(
            id=_new_id(),
            session_id=new.session_id,
            user_id=new.user_id,
            seq=int(last_seq) + 1,
            status=TurnStatus.QUEUED,
            attempt=0,
            model=new.model,
            user_text=new.text,
            user_message_id=_new_id(),
            assistant_message_id=_new_id(),
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
        await conn.execute(
            sa.update(sessions).where(sessions.c.id == new.session_id).values(**values)
        )
        return SubmitResult(turn, created=True, earlier_active=active)

    async def _lock_session(
        self, conn: AsyncConnection, session_id: str, user_id: str
    ) -> SessionRecord:
        """Read (and on PostgreSQL lock) the user's session; ``SessionNotFound`` if not theirs."""
        row = (
            await conn.execute(
                sa.select(sessions).where(sessions.c.id == session_id).with_for_update()
            )
        ).first()
        if row is None or row.user_id != user_id:
            raise SessionNotFound(f"session {session_id} not found")
        return _session(row._mapping)

    async def _active(
        self, conn: AsyncConnection, session_id: str, *, before_seq: int | None = None
    ) -> list[TurnRecord]:
        query = (
            _turn_query()
            .where(turns.c.session_id == session_id, turns.c.status.in_(_ACTIVE))
            .order_by(turns.c.seq)
        )
        if before_seq is not None:
            query = query.where(turns.c.seq < before_seq)
        return [_turn(r._mapping) for r in (await conn.execute(query)).all()]

    async def _count_active_for_user(self, conn: AsyncConnection, user_id: str) -> int:
        """The user's sessions with a queued or running turn: each is one turn
        running or about to run (a session runs one turn at a time)."""
        count = (
            await conn.execute(
                sa.select(sa.func.count(sa.distinct(turns.c.session_id))).where(
                    turns.c.user_id == user_id, turns.c.status.in_(_ACTIVE)
                )
            )
        ).scalar_one()
        return int(count)

    async def get_turn(self, turn_id: str) -> TurnRecord:
        async with self._read() as conn:
            row = (await conn.execute(_turn_query().where(turns.c.id == turn_id))).first()
        if row is None:
            raise TurnNotFound(f"turn {turn_id} not found")
        return _turn(row._mapping)

    async def active_turns(self, session_id: str) -> list[TurnRecord]:
        async with self._read() as conn:
            return await self._active(conn, session_id)

    async def dispatch_next(self, session_id: str) -> TurnRecord | None:
        async with self._write() as conn:
            locked = (
                await conn.execute(
                    sa.select(sessions.c.id).where(sessions.c.id == session_id).with_for_update()
                )
            ).first()
            if locked is None:
                return None
            in_flight = (
                await conn.execute(
                    sa.select(turns.c.id)
                    .where(
                        turns.c.session_id == session_id,
                        turns.c.dispatched == sa.true(),
                        turns.c.status.in_(_ACTIVE),
                    )
                    .limit(1)
                )
            ).first()
            if in_flight is not None:
                return None
            row = (
                await conn.execute(
                    _turn_query()
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
            await conn.execute(sa.update(turns).where(turns.c.id == row.id).values(dispatched=True))
            return dataclasses.replace(_turn(row._mapping), dispatched=True)

    async def undispatched_heads(self, limit: int = 100) -> list[TurnRecord]:
        other = turns.alias("other")
        in_flight = (
            sa.select(other.c.id)
            .where(
                other.c.session_id == turns.c.session_id,
                other.c.dispatched == sa.true(),
                other.c.status.in_(_ACTIVE),
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
            _turn_query()
            .where(turns.c.status == TurnStatus.QUEUED.value, ~in_flight, ~earlier_queued)
            .order_by(turns.c.created_at, turns.c.id)
            .limit(limit)
        )
        async with self._read() as conn:
            return [_turn(r._mapping) for r in (await conn.execute(query)).all()]

    async def dispatched_active(self, limit: int = 500) -> list[TurnRecord]:
        query = (
            _turn_query()
            .where(turns.c.dispatched == sa.true(), turns.c.status.in_(_ACTIVE))
            .order_by(turns.c.created_at, turns.c.id)
            .limit(limit)
        )
        async with self._read() as conn:
            return [_turn(r._mapping) for r in (await conn.execute(query)).all()]

    async def start_turn(self, turn_id: str, attempt: int) -> TurnRecord | None:
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(turns)
                .where(
                    turns.c.id == turn_id,
                    turns.c.attempt == attempt,
                    turns.c.status.in_(_ACTIVE),
                )
                .values(
                    status=TurnStatus.RUNNING.value,
                    attempt=turns.c.attempt + 1,
                    started_at=self._now(),
                )
            )
            if result.rowcount != 1:
                return None
            row = (await conn.execute(_turn_query().where(turns.c.id == turn_id))).one()
            return _turn(row._mapping)

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
            row = (
                await conn.execute(
                    sa.select(turns.c.session_id, turns.c.assistant_message_id).where(
                        turns.c.id == turn_id
                    )
                )
            ).first()
            if row is None:
                return False
            # Session before turn: the lock order dispatch_next uses.
            await conn.execute(
                sa.select(sessions.c.id).where(sessions.c.id == row.session_id).with_for_update()
            )
            now = self._now()
            result = await conn.execute(
                sa.update(turns)
                .where(
                    turns.c.id == turn_id,
                    turns.c.attempt == attempt,
                    turns.c.status.in_(_ACTIVE),
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

    async def request_cancel(self, turn_id: str) -> TurnRecord:
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(turns).where(turns.c.id == turn_id).values(cancel_requested=True)
            )
            if result.rowcount != 1:
                raise TurnNotFound(f"turn {turn_id} not found")
            row = (await conn.execute(_turn_query().where(turns.c.id == turn_id))).one()
            return _turn(row._mapping)

    async def count_active_for_user(self, user_id: str) -> int:
        async with self._read() as conn:
            return await self._count_active_for_user(conn, user_id)
