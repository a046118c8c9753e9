"""Schema migrations: idempotent, checked, and safe to run from several replicas."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from turnrelay.errors import BackendUnavailable, SchemaOutOfDate
from turnrelay.store.migrate import ADVISORY_LOCK_KEY, check_schema, head_revision, migrate


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg", "postgresql")


@pytest.fixture
async def pg_database(postgres_url: str, unique: str) -> AsyncIterator[str]:
    name = f"turnrelay_test_{unique}"
    admin = await asyncpg.connect(_plain(postgres_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/sub/dir/chat.db"
    else:
        yield request.getfixturevalue("pg_database")


async def _tables_and_revision(url: str) -> tuple[set[str], list[str]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
            revisions = (
                (await conn.execute(sa.text("SELECT version_num FROM alembic_version")))
                .scalars()
                .all()
            )
    finally:
        await engine.dispose()
    return tables, list(revisions)


async def test_check_schema_raises_on_an_empty_database(empty_url: str) -> None:
    with pytest.raises(SchemaOutOfDate) as info:
        await check_schema(empty_url)
    assert str(info.value) == (
        f"database schema is at nothing, code needs {head_revision()}: run `turnrelay migrate`"
    )


async def test_migrate_then_check_passes_and_a_second_migrate_is_a_no_op(empty_url: str) -> None:
    await migrate(empty_url)
    await check_schema(empty_url)
    first = await _tables_and_revision(empty_url)
    assert {"sessions", "turns", "messages", "alembic_version"} <= first[0]
    assert first[1] == [head_revision()]
    await migrate(empty_url)
    assert await _tables_and_revision(empty_url) == first
    await check_schema(empty_url)


async def test_check_schema_reports_an_unknown_newer_revision(empty_url: str) -> None:
    await migrate(empty_url)
    engine = create_async_engine(empty_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        await engine.dispose()
    with pytest.raises(SchemaOutOfDate, match="newer than this code"):
        await check_schema(empty_url)


async def test_unreachable_database_is_backend_unavailable() -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/test"
    with pytest.raises(BackendUnavailable):
        await migrate(url)
    with pytest.raises(BackendUnavailable):
        await check_schema(url)


@pytest.mark.postgres
async def test_concurrent_migrate_from_tasks_is_safe(pg_database: str) -> None:
    await asyncio.gather(*(migrate(pg_database) for _ in range(4)))
    await check_schema(pg_database)
    assert (await _tables_and_revision(pg_database))[1] == [head_revision()]


@pytest.mark.postgres
@pytest.mark.slow
async def test_concurrent_migrate_from_processes_is_safe(pg_database: str) -> None:
    code = (
        "import asyncio, sys\n"
        "from turnrelay.store.migrate import migrate\n"
        "asyncio.run(migrate(sys.argv[1]))\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            pg_database,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    await check_schema(pg_database)


@pytest.mark.postgres
async def test_migrate_waits_for_the_advisory_lock(pg_database: str) -> None:
    holder = await asyncpg.connect(_plain(pg_database))
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
        task = asyncio.create_task(migrate(pg_database))
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert not done, "migrate ran while another replica held the lock"
        await holder.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
        await asyncio.wait_for(task, timeout=30)
    finally:
        await holder.close()
    await check_schema(pg_database)
