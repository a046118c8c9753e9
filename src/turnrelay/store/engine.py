"""The store's engine: connecting to SQLite or PostgreSQL, and translating errors.

Where the two dialects differ is how concurrent writers are serialised. On
PostgreSQL that is row locks, taken by the transactions themselves (see
``turnrelay.store.submit``). On **SQLite** (aiosqlite) every writing
transaction starts with ``BEGIN IMMEDIATE``, taking the database's single write
lock up front; a deferred transaction that later tries to write fails at once
with "database is locked" when another connection wrote meanwhile, whatever the
busy timeout. Reads stay deferred and, in WAL mode, never wait for writers. A
connection is a writer when it was opened with the ``WRITE_OPTION`` execution
option set.

Driver and SQLAlchemy errors never leave the store: ``translate_errors`` turns
them into ``BackendUnavailable`` (cannot reach or use the database),
``SchemaOutOfDate`` (tables missing) or a plain ``TurnrelayError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from turnrelay.errors import BackendUnavailable, SchemaOutOfDate, TurnrelayError
from turnrelay.store import inline_sqlite

# How long a SQLite writer waits for another connection's write lock before
# failing. Writes here are short single transactions; a long wait only happens
# under a burst, and failing the request then is worse than waiting.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# How long connecting to PostgreSQL may take before the store reports it
# unavailable (asyncpg's own default is 60 s, longer than any HTTP client waits).
POSTGRES_CONNECT_TIMEOUT_S = 10.0

# How long a caller waits for a connection of a bounded pool before the store
# reports the database unavailable (and the caller may retry).
POOL_WAIT_S = 10.0

# The execution option marking a writing engine: on SQLite its transactions
# begin with BEGIN IMMEDIATE.
WRITE_OPTION = "turnrelay_write"
# SQLSTATE undefined_table: the schema was never migrated.
_PG_UNDEFINED_TABLE = "42P01"
# SQLSTATE classes meaning "cannot use this server now": connection exception,
# bad credentials, unknown database, out of resources, shutting down.
_PG_UNAVAILABLE_PREFIXES = ("08", "28", "3D", "53", "57P")


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


def sqlite_database(url: str) -> str | None:
    """The SQLite database file of ``url``; ``None`` for PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    return parsed.database or ":memory:"


def create_engine(url: str, *, pool_size: int | None = None) -> AsyncEngine:
    """An engine for ``url``, configured for the store's concurrency (see module doc).

    Connects lazily, but creates the parent directory of a SQLite file. On
    PostgreSQL ``pool_size`` bounds the connections: exactly that many, no
    overflow (the db-manager's one pool); ``None`` keeps SQLAlchemy's default.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Run on the loop's thread (``inline_sqlite``): writers must take
        # ``sqlite_writer_lock`` before they begin.
        engine = create_async_engine(
            parsed, connect_args={"async_creator_fn": inline_sqlite.connect}
        )
        _configure_sqlite(engine)
        return engine
    bounds: dict[str, Any] = {}
    if pool_size is not None:
        bounds = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": POOL_WAIT_S}
    return create_async_engine(
        parsed,
        pool_pre_ping=True,
        connect_args={"timeout": POSTGRES_CONNECT_TIMEOUT_S},
        **bounds,
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
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
