"""The composition root: settings -> services. The only module that imports
concrete backends; everything else sees the ports.

    build_services(settings, role)   connects nothing; ``startup()`` does
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from turnrelay.errors import ConfigError, TurnrelayError
from turnrelay.events.base import EventLog
from turnrelay.lease.base import Lease
from turnrelay.metrics import Metrics
from turnrelay.queue.base import TurnQueue
from turnrelay.runtime.base import AgentRuntime
from turnrelay.settings import ModelRef, Settings
from turnrelay.storage.base import ObjectStore
from turnrelay.store.base import ChatStore, ExecutorStore

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from turnrelay.executor.worker import Executor
from turnrelay.tools.registry import ToolRegistry, build_registry

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    # The API's whole ChatStore (direct SQL); an executor's may be the RPC
    # client of the db-manager (``database_access``).
    store: ExecutorStore
    queue: TurnQueue
    events: EventLog
    lease: Lease
    metrics: Metrics
    storage: ObjectStore
    runtimes: dict[str, AgentRuntime] = field(default_factory=dict)

    async def startup(self) -> None:
        await self.store.startup()
        await self.storage.startup()
        await self.events.startup()
        await self.lease.startup()
        await self.queue.startup()
        for runtime in self.runtimes.values():
            await runtime.startup()

    async def shutdown(self) -> None:
        for closer in (
            *(r.shutdown for r in self.runtimes.values()),
            self.queue.shutdown,
            self.lease.shutdown,
            self.events.shutdown,
            self.storage.shutdown,
            self.store.shutdown,
        ):
            with contextlib.suppress(TurnrelayError):
                await closer()

    def executor(self, *, grace: float) -> Executor:
        from turnrelay.executor.worker import Executor

        return Executor(
            settings=self.settings,
            store=self.store,
            events=self.events,
            lease=self.lease,
            queue=self.queue,
            runtimes=self.runtimes,
            metrics=self.metrics,
            grace=grace,
        )

    def api(self) -> Starlette:
        from turnrelay.api.app import create_app

        return create_app(
            settings=self.settings,
            store=self.chat_store(),
            events=self.events,
            queue=self.queue,
            metrics=self.metrics,
            objects=self.storage,
            readiness=self.ready,
        )

    def chat_store(self) -> ChatStore:
        from turnrelay.store.sql import SqlChatStore

        if not isinstance(self.store, SqlChatStore):
            raise ConfigError("the API needs direct database access: set TURNRELAY_DATABASE_URL")
        return self.store

    async def ready(self) -> None:
        """Raises ``BackendUnavailable`` naming the first backend that does not answer."""
        await self.store.ping()
        await self.events.ping()
        await self.queue.ping()


def database_access(settings: Settings, role: str) -> str:
    """How a process reaches the database: ``direct`` (its own pool, from
    ``TURNRELAY_DATABASE_URL``) or, for an executor only, ``rpc`` (through the
    db-manager at ``TURNRELAY_DATABASE_MANAGER_URL``). An executor given
    neither refuses to start, saying which to set: the embedded default
    (a SQLite file of this machine) is never what a separate executor means."""
    if role != "executor" or "database_url" in settings.model_fields_set:
        return "direct"
    if settings.database_manager_url:
        if not settings.database_manager_url.startswith(("http://", "https://")):
            raise ConfigError(
                "TURNRELAY_DATABASE_MANAGER_URL must be the db-manager's http(s):// address, "
                f"got {settings.database_manager_url!r}"
            )
        return "rpc"
    raise ConfigError(
        "no database: TURNRELAY_DATABASE_URL is unset (the embedded default is a SQLite file "
        "of this machine); set it to postgresql+asyncpg://… (a pool of its own) or set "
        "TURNRELAY_DATABASE_MANAGER_URL=http://…:8005 (through `turnrelay db-manager`, "
        "one pool for every executor)"
    )


def check_distributed(settings: Settings, role: str) -> None:
    """``api``, ``executor`` and ``db-manager`` are separate processes:
    in-process backends cannot be shared between them, so refuse them with the
    reason."""
    if role == "db-manager":
        if not settings.database_url.startswith("postgresql"):
            raise ConfigError(
                "`turnrelay db-manager` serves a database shared by every executor: set "
                "TURNRELAY_DATABASE_URL=postgresql+asyncpg://… (not SQLite or memory)"
            )
        return
    problems = []
    if settings.broker_url.startswith("memory:"):
        problems.append("TURNRELAY_BROKER_URL is memory:// (use amqp://…)")
    if settings.redis_url.startswith("memory:"):
        problems.append("TURNRELAY_REDIS_URL is memory:// (use redis://…)")
    try:
        access = database_access(settings, role)
    except ConfigError as exc:
        problems.append(exc.detail)
    else:
        if access == "direct" and settings.database_url.startswith("sqlite"):
            problems.append("TURNRELAY_DATABASE_URL is SQLite (use postgresql+asyncpg://…)")
    if settings.storage_url.startswith("memory:"):
        problems.append("TURNRELAY_STORAGE_URL is memory:// (use s3://, gs:// or a shared file://)")
    if problems:
        raise ConfigError(
            f"`turnrelay {role}` runs as one of several processes, which cannot share "
            "in-process or file-local backends: "
            + "; ".join(problems)
            + ". Use `turnrelay serve` for a single process."
        )


def with_default_model(settings: Settings) -> Settings:
    """The settings ``serve`` runs with: with no model configured, the bundled
    local model when its extra is installed; otherwise how to configure one."""
    if settings.model:
        return settings
    from turnrelay.runtime.local import DEFAULT_MODEL, INSTALL_HINT, local_available

    if local_available():
        log.info("no TURNRELAY_MODEL set: using the bundled %s (runs on this CPU)", DEFAULT_MODEL)
        return settings.model_copy(update={"model": DEFAULT_MODEL})
    raise ConfigError(
        "no model configured. Set TURNRELAY_MODEL=openai:<model> with OPENAI_API_KEY "
        "(and OPENAI_BASE_URL for OpenRouter, vLLM, Ollama or llama.cpp), or run a small "
        f"model on this machine with no key: {INSTALL_HINT}. To try the plumbing only: "
        "`turnrelay fake-llm` with TURNRELAY_MODEL=openai:fake "
        "OPENAI_BASE_URL=http://127.0.0.1:8099/v1."
    )


def build_runtimes(settings: Settings, storage: ObjectStore) -> dict[str, AgentRuntime]:
    providers = {ModelRef.parse(m).provider for m in settings.allowed_models()}
    runtimes: dict[str, AgentRuntime] = {}
    tools = (
        build_registry(settings.tools, require_approval=settings.tools_requiring_approval)
        if providers
        else ToolRegistry()
    )
    # Resolved once, at startup: tools and the CLI get an absolute path.
    sandbox = Path(settings.sandbox_dir).resolve()
    for provider in providers:
        if provider == "openai":
            from turnrelay.runtime.openai import OpenAIRuntime

            runtimes["openai"] = OpenAIRuntime(
                base_url=os.environ.get("OPENAI_BASE_URL"),
                api_key=os.environ.get("OPENAI_API_KEY"),
                tools=tools,
                sandbox_dir=sandbox,
                max_tool_steps=settings.max_tool_steps,
            )
        elif provider == "claude":
            try:
                from turnrelay.runtime.claude import ClaudeRuntime
            except ImportError as exc:
                raise ConfigError(
                    "the `claude` runtime needs the claude-agent-sdk package, which bundles "
                    "the Claude Code CLI: pip install 'turnrelay[claude]'"
                ) from exc

            runtimes["claude"] = ClaudeRuntime(
                sandbox_dir=sandbox,
                tools=tools,
                base_url=os.environ.get("ANTHROPIC_BASE_URL"),
                api_key=os.environ.get("ANTHROPIC_API_KEY"),
                auth_token=os.environ.get("ANTHROPIC_AUTH_TOKEN"),
                cli_tools=settings.claude_tools,
                max_tool_steps=settings.max_tool_steps,
                # Confines the CLI and what it runs to the session's directory.
                bwrap=shutil.which("bwrap"),
                objects=storage,
            )
        elif provider == "local":
            from turnrelay.runtime.local import LocalRuntime, find_gguf

            names = {
                r.name
                for r in map(ModelRef.parse, settings.allowed_models())
                if r.provider == "local"
            }
            if len(names) > 1:
                raise ConfigError(f"one local model at a time, got {sorted(names)}")
            runtimes["local"] = LocalRuntime(find_gguf(names.pop()))
        else:
            raise ConfigError(
                f"unknown model provider {provider!r}: this build supports `claude:` "
                "(the Claude Code CLI, via ANTHROPIC_BASE_URL), `openai:` "
                "(any OpenAI-compatible endpoint via OPENAI_BASE_URL) and `local:smollm2`"
            )
    return runtimes


def build_services(settings: Settings, role: str) -> Services:
    """Concrete backends from URLs; nothing connects before ``startup()``."""
    metrics = Metrics(role, settings.num_workers if role in ("executor", "serve") else 0)

    store: ExecutorStore
    if database_access(settings, role) == "rpc":
        from turnrelay.store.rpc_client import RpcExecutorStore

        assert settings.database_manager_url is not None
        store = RpcExecutorStore(
            settings.database_manager_url,
            secret=settings.database_manager_secret,
            max_connections=settings.num_workers * 2 + 10,
        )
    elif settings.database_url.startswith(("sqlite", "postgresql")):
        from turnrelay.store.sql import SqlChatStore

        store = SqlChatStore(settings.database_url)
    else:
        raise ConfigError(f"unsupported TURNRELAY_DATABASE_URL {settings.database_url!r}")

    queue: TurnQueue
    if settings.broker_url.startswith("memory:"):
        from turnrelay.queue.memory import MemoryTurnQueue

        queue = MemoryTurnQueue()
    elif settings.broker_url.startswith(("amqp:", "amqps:")):
        from turnrelay.queue.rabbitmq import RabbitTurnQueue

        queue = RabbitTurnQueue(settings.broker_url, name=settings.namespace)
    else:
        raise ConfigError(f"unsupported TURNRELAY_BROKER_URL {settings.broker_url!r}")

    events: EventLog
    lease: Lease
    if settings.redis_url.startswith("memory:"):
        from turnrelay.events.memory import MemoryEventLog
        from turnrelay.lease.memory import MemoryLease

        events, lease = MemoryEventLog(), MemoryLease()
    elif settings.redis_url.startswith(("redis:", "rediss:", "unix:")):
        from turnrelay.events.redis import RedisEventLog
        from turnrelay.lease.redis import RedisLease

        events = RedisEventLog(settings.redis_url, key_prefix=settings.namespace)
        lease = RedisLease(settings.redis_url, key_prefix=settings.namespace)
    else:
        raise ConfigError(f"unsupported TURNRELAY_REDIS_URL {settings.redis_url!r}")

    from turnrelay.storage.factory import open_object_store

    storage = open_object_store(settings.storage_url, environ=os.environ)
    runtimes = build_runtimes(settings, storage) if role in ("executor", "serve") else {}
    return Services(settings, store, queue, events, lease, metrics, storage, runtimes)
