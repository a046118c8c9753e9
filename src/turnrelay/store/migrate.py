"""Applying and checking the schema (Alembic, configured in code).

``migrate`` is what ``turnrelay migrate`` and ``turnrelay serve`` run. On
PostgreSQL it holds a session-level advisory lock for the whole upgrade, so
several replicas started at once run it one after another: the first upgrades,
the others find the schema at head and do nothing. ``check_schema`` is what
``api``, ``executor`` and ``db-manager`` run instead: they never change the
schema, they refuse to start on an old one.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from turnrelay.errors import SchemaOutOfDate
from turnrelay.store.engine import create_engine, translate_errors

MIGRATIONS = Path(__file__).parent / "migrations"

# An arbitrary constant naming "the turnrelay schema migration" among advisory
# locks of the database ("turnrel" in ASCII, fits a signed bigint).
ADVISORY_LOCK_KEY = 0x7475726E72656C


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations shipped"
    return head


def _upgrade(connection: Connection, config: Config) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema; a no-op when it is there."""
    engine = create_engine(url)
    try:
        async with translate_errors():
            await _migrate(engine)
    finally:
        await engine.dispose()


async def _migrate(engine: AsyncEngine) -> None:
    postgres = engine.dialect.name == "postgresql"
    async with engine.connect() as conn:
        if postgres:
            await conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            await conn.commit()
        try:
            await conn.run_sync(_upgrade, alembic_config())
            await conn.commit()
        finally:
            if postgres:
                await conn.rollback()
                await conn.execute(
                    sa.text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY}
                )
                await conn.commit()


async def check_schema(url: str) -> None:
    """Raise ``SchemaOutOfDate`` unless the database at ``url`` is at the code's head."""
    head = head_revision()
    engine = create_engine(url)
    try:
        async with translate_errors(), engine.connect() as conn:
            current = await conn.run_sync(_current_revision)
    finally:
        await engine.dispose()
    if current == head:
        return
    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current is not None and current not in known:
        raise SchemaOutOfDate(
            f"database schema is at {current}, newer than this code ({head}): upgrade turnrelay"
        )
    raise SchemaOutOfDate(
        f"database schema is at {current or 'nothing'}, code needs {head}: run `turnrelay migrate`"
    )
