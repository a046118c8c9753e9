"""A distributed turnrelay cluster of real processes for end-to-end tests:
`turnrelay api` replicas and `turnrelay executor`s over RabbitMQ, Redis and
PostgreSQL, each test run in its own database and broker/Redis namespace.

In ``db-manager`` mode a `turnrelay db-manager` runs too, and the executors
have no ``TURNRELAY_DATABASE_URL``: every database call of theirs goes through
it (``MODES`` lists both, for tests that run their scenarios in each)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

from tests.conftest import AMQP_URL as TEST_AMQP_URL
from tests.conftest import POSTGRES_URL, require_server
from tests.conftest import REDIS_URL as TEST_REDIS_URL
from tests.procs import FakeLLMProc, Proc, free_port, start, start_fake_llm

AMQP_URL = TEST_AMQP_URL
REDIS_URL = TEST_REDIS_URL
# How executors reach the database: their own pool, or through the db-manager.
MODES = ("direct", "db-manager")
DB_MANAGER_SECRET = "test-db-manager-secret-0123456789"


def _pg_admin_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _create_db(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(_pg_admin_dsn(admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_db(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(_pg_admin_dsn(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass
class Cluster:
    tmp: Path
    llm: FakeLLMProc
    postgres_url: str
    amqp_url: str = AMQP_URL
    redis_url: str = REDIS_URL
    namespace: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    apis: list[Proc] = field(default_factory=list)
    executors: list[Proc] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    mode: str = "direct"
    db_manager: Proc | None = None
    db_manager_port: int = field(default_factory=free_port)

    @property
    def db_name(self) -> str:
        return f"tr_{self.namespace}"

    @property
    def database_url(self) -> str:
        base = self.postgres_url.rsplit("/", 1)[0]
        return f"{base}/{self.db_name}"

    def env(self) -> dict[str, str]:
        return {
            "TURNRELAY_DATABASE_URL": self.database_url,
            "TURNRELAY_BROKER_URL": self.amqp_url,
            "TURNRELAY_REDIS_URL": self.redis_url,
            "TURNRELAY_STORAGE_URL": f"file://{self.tmp}/storage",
            "TURNRELAY_NAMESPACE": self.namespace,
            "TURNRELAY_MODEL": "openai:fake",
            "TURNRELAY_API_KEYS": "tok-alice=alice,tok-bob=bob",
            "TURNRELAY_HEARTBEAT_INTERVAL": "1",
            "TURNRELAY_SHUTDOWN_GRACE": "10s",
            "TURNRELAY_MAX_RUNNING_TURNS_PER_USER": "100",
            "OPENAI_BASE_URL": self.llm.base_url,
            "OPENAI_API_KEY": "unused",
            **self.extra_env,
        }

    def create(self) -> None:
        asyncio.run(_create_db(self.postgres_url, self.db_name))
        migrate = subprocess.run(
            [sys.executable, "-m", "turnrelay.cli", "migrate"],
            env={
                **self.env(),
                "PATH": "/usr/bin:/bin",
                # a benchmark may point the processes at another checkout
                **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
            },
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.tmp,
        )
        assert migrate.returncode == 0, migrate.stderr

    def start_api(self) -> Proc:
        port = free_port()
        proc = start(
            f"api{len(self.apis)}",
            ["api", "--port", str(port)],
            env=self.env(),
            tmp=self.tmp,
            health_url=f"http://127.0.0.1:{port}/health",
        )
        proc.url = f"http://127.0.0.1:{port}"
        self.apis.append(proc)
        return proc

    def start_db_manager(self, **env: str) -> Proc:
        """The db-manager, on the cluster's one port (a restart takes it again)."""
        port = self.db_manager_port
        proc = start(
            "db-manager",
            ["db-manager", "--port", str(port)],
            env={
                **self.env(),
                "TURNRELAY_DATABASE_MANAGER_SECRET": DB_MANAGER_SECRET,
                "TURNRELAY_DATABASE_MANAGER_POOL_SIZE": "5",
                **env,
            },
            tmp=self.tmp,
            health_url=f"http://127.0.0.1:{port}/ready",
        )
        proc.url = f"http://127.0.0.1:{port}"
        self.db_manager = proc
        return proc

    def executor_env(self) -> dict[str, str]:
        env = self.env()
        if self.mode == "db-manager":
            del env["TURNRELAY_DATABASE_URL"]
            env["TURNRELAY_DATABASE_MANAGER_URL"] = f"http://127.0.0.1:{self.db_manager_port}"
            env["TURNRELAY_DATABASE_MANAGER_SECRET"] = DB_MANAGER_SECRET
        return env

    def start_executor(self, **env: str) -> Proc:
        port = free_port()
        proc = start(
            f"executor{len(self.executors)}",
            ["executor"],
            env={**self.executor_env(), "TURNRELAY_EXECUTOR_PORT": str(port), **env},
            tmp=self.tmp,
            health_url=f"http://127.0.0.1:{port}/health",
        )
        proc.url = f"http://127.0.0.1:{port}"
        self.executors.append(proc)
        return proc

    def finished_turns(self, executor: Proc) -> float:
        text = httpx.get(f"{executor.url}/metrics", timeout=5).text
        return sum(
            float(m)
            for m in re.findall(
                r'^turnrelay_turns_finished_total\{status="[a-z]+"\} ([0-9.e+]+)$', text, re.M
            )
        )

    def stop(self) -> None:
        for proc in [*self.apis, *self.executors]:
            proc.stop()
        if self.db_manager is not None:
            self.db_manager.stop()
        asyncio.run(_drop_db(self.postgres_url, self.db_name))


@contextlib.contextmanager
def running_cluster(
    tmp: Path,
    *,
    apis: int,
    executors: int,
    redis_url: str | None = None,
    amqp_url: str | None = None,
    postgres_url: str | None = None,
    extra_env: dict[str, str] | None = None,
    mode: str = "direct",
) -> Iterator[Cluster]:
    """A fake LLM, a fresh database and namespace, and the given processes;
    skips locally (fails under CI) when a server is unreachable. A test may
    put its own Redis, RabbitMQ node or PostgreSQL proxy under the cluster."""
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    if amqp_url is None:
        require_server("RabbitMQ", AMQP_URL, 5672)
    if redis_url is None:
        require_server("Redis", REDIS_URL, 6379)
    llm = start_fake_llm(tmp)
    cluster = Cluster(
        tmp=tmp,
        llm=llm,
        postgres_url=postgres_url or POSTGRES_URL,
        amqp_url=amqp_url or AMQP_URL,
        redis_url=redis_url or REDIS_URL,
        extra_env=extra_env or {},
        mode=mode,
    )
    try:
        cluster.create()
        if mode == "db-manager":
            cluster.start_db_manager()
        for _ in range(apis):
            cluster.start_api()
        for _ in range(executors):
            cluster.start_executor()
        yield cluster
    finally:
        cluster.stop()
        llm.proc.stop()
