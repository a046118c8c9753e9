"""Fixtures shared by the contract suites."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.storage_servers import (
    StoreSpec,
    create_gcs_bucket,
    create_s3_bucket,
)

BACKENDS = ["memory", "local", "s3", "gcs"]
SHARED_BACKENDS = ["local", "s3", "gcs"]  # reachable from a second process


async def pg_admin(postgres_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))


@pytest.fixture
async def pg_database(postgres_url: str, unique: str) -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database; its URL."""
    name = f"turnrelay_test_{unique}"
    admin = await pg_admin(postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _spec(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    unique = uuid.uuid4().hex[:12]
    if kind == "memory":
        return StoreSpec("memory")
    if kind == "local":
        return StoreSpec("local", root=str(tmp_path / "store"))
    if kind == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        create_s3_bucket(endpoint, f"b-{unique}")
        return StoreSpec("s3", bucket=f"b-{unique}", prefix="tenant/t1", endpoint=endpoint)
    url = request.getfixturevalue("fake_gcs_url")
    create_gcs_bucket(url, f"b-{unique}")
    return StoreSpec("gcs", bucket=f"b-{unique}", prefix="tenant/t1", endpoint=url)


@pytest.fixture(params=BACKENDS)
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    return _spec(request.param, request, tmp_path)


@pytest.fixture(params=SHARED_BACKENDS)
def shared_spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    return _spec(request.param, request, tmp_path)


@pytest.fixture
async def objects(spec: StoreSpec) -> AsyncIterator[Any]:
    """A started ObjectStore of the ``spec`` backend."""
    built = spec.build()
    await built.startup()
    try:
        yield built
    finally:
        await built.shutdown()
