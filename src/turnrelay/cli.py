"""``turnrelay`` command line: serve, api, executor, db-manager, migrate, fake-llm, chat.

Settings are loaded here, once, and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from turnrelay import logs, tracing
from turnrelay.errors import ConfigError, SchemaOutOfDate, TurnrelayError
from turnrelay.settings import Settings

if TYPE_CHECKING:
    from turnrelay.services import Services


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


def _check_listening(settings: Settings, host: str) -> None:
    """Every process that serves the HTTP API (``serve``, ``api``): without API
    keys or JWTs every caller is the same local user, who may read and delete every
    chat, so only a loopback address is allowed."""
    if not settings.authenticated() and not _is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host}: without TURNRELAY_API_KEYS or JWTs every caller "
            "is the same local user. Set TURNRELAY_API_KEYS=token=user_id,… (or "
            "TURNRELAY_JWT_SECRET / TURNRELAY_JWT_JWKS_URL) or use --host 127.0.0.1."
        )


class _Server(uvicorn.Server):
    """uvicorn, returning normally on SIGTERM/SIGINT once it has shut down.

    uvicorn re-raises the signal after its graceful shutdown, which would kill
    the process before the caller drains its executor and closes its backends;
    this server handles both signals itself instead. ``on_exit`` runs first
    (the API's stream hub ends its streams there)."""

    on_exit: Callable[[], None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.on_exit is not None:
            self.on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def _http_server(services: Services, host: str, port: int) -> uvicorn.Server:
    """The API under uvicorn. On SIGTERM the stream hub ends every open stream
    first (without ``[DONE]``), so clients resume on another replica at once
    instead of waiting for the graceful-shutdown timeout."""
    app = services.api()
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="info",
            log_config=None,  # uvicorn's lines go through turnrelay's handler
            timeout_graceful_shutdown=5,
            access_log=False,
        )
    )
    server.on_exit = app.state.hub.close
    return server


def _freeze_heap() -> None:
    """Move what startup made (modules, the SQL metadata, pydantic's validators,
    the SDK clients: it lives as long as the process) out of the collector's
    generations, and collect the youngest less often. Under load the full
    collections otherwise rescan all of it again and again: about a tenth of the
    server's CPU with 500 turns at once (``BENCHMARKS.md``)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


# Allocations between collections of the youngest generation (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000


async def _serve(settings: Settings, host: str, port: int) -> None:
    from turnrelay.services import build_services
    from turnrelay.store.migrate import migrate

    await migrate(settings.database_url)
    services = build_services(settings, "serve")
    await services.startup()
    executor = services.executor(grace=settings.grace(30.0))
    server = _http_server(services, host, port)
    _freeze_heap()
    exec_task = asyncio.create_task(executor.run(), name="executor")
    try:
        await server.serve()
    finally:
        executor.stop()
        await exec_task
        await services.shutdown()


async def _api(settings: Settings, host: str, port: int) -> None:
    from turnrelay.services import build_services, check_distributed
    from turnrelay.store.migrate import check_schema

    check_distributed(settings, "api")
    await check_schema(settings.database_url)
    services = build_services(settings, "api")
    await services.startup()
    _freeze_heap()
    try:
        await _http_server(services, host, port).serve()
    finally:
        await services.shutdown()


async def _executor(settings: Settings) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from turnrelay.services import build_services, check_distributed, database_access
    from turnrelay.store.migrate import check_schema

    check_distributed(settings, "executor")
    if not settings.model:
        raise ConfigError("no model configured: set TURNRELAY_MODEL (and TURNRELAY_MODELS)")
    if database_access(settings, "executor") == "direct":
        await check_schema(settings.database_url)
    # else the RPC client checks the schema the db-manager serves, at startup.
    services = build_services(settings, "executor")
    await services.startup()
    executor = services.executor(grace=settings.grace(25 * 60.0))

    async def health(request: Request) -> Response:
        return JSONResponse(
            {"status": "ok", "executor": executor.id, "active_turns": len(executor.running)}
        )

    async def metrics(request: Request) -> Response:
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")

    ops = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/health", health), Route("/metrics", metrics)]),
            host="0.0.0.0",
            port=settings.executor_port,
            log_level="warning",
            log_config=None,
        )
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, executor.stop)
    # `kill -USR1 <pid>`: log where every task waits (a turn that hangs, say).
    loop.add_signal_handler(signal.SIGUSR1, logs.dump_tasks)
    ops_task = asyncio.create_task(ops.serve())
    _freeze_heap()
    try:
        await executor.run()
    finally:
        ops.should_exit = True
        with contextlib.suppress(Exception):
            await ops_task
        await services.shutdown()


# A db-manager secret shorter than this is refused: it guards the whole database.
MIN_SECRET_CHARS = 16


async def _db_manager(settings: Settings, host: str, port: int) -> None:
    from turnrelay.metrics import Metrics
    from turnrelay.services import check_distributed
    from turnrelay.store.migrate import check_schema
    from turnrelay.store.rpc_service import create_app
    from turnrelay.store.sql import SqlChatStore

    check_distributed(settings, "db-manager")
    secret = settings.database_manager_secret
    if secret is not None and len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"TURNRELAY_DATABASE_MANAGER_SECRET must have at least {MIN_SECRET_CHARS} characters"
        )
    if not secret and not _is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without TURNRELAY_DATABASE_MANAGER_SECRET: anyone "
            "who reaches the port could change every turn. Set a secret (on the executors "
            "too) or use --host 127.0.0.1."
        )
    await check_schema(settings.database_url)
    store = SqlChatStore(settings.database_url, pool_size=settings.database_manager_pool_size)
    app = create_app(store, secret=secret, metrics=Metrics("db-manager"))
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="info",
            log_config=None,  # uvicorn's lines go through turnrelay's handler
            access_log=False,
            # In-flight calls end within a pool wait and a statement; then the
            # pool is closed (the app's lifespan).
            timeout_graceful_shutdown=15,
        )
    )
    await server.serve()


async def _migrate(settings: Settings) -> None:
    from turnrelay.store.migrate import migrate

    await migrate(settings.database_url)
    print("database schema is up to date")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="turnrelay", description="AI copilot chat backend")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="API and executor in one process (embedded)")
    p_api = sub.add_parser("api", help="the HTTP API (distributed mode)")
    for p in (p_serve, p_api):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
    sub.add_parser("executor", help="run turns from the broker (distributed mode)")
    p_dbm = sub.add_parser(
        "db-manager",
        help="serve the executors' database calls from one pool (distributed mode)",
    )
    p_dbm.add_argument("--host", default="127.0.0.1")
    p_dbm.add_argument("--port", type=int, default=8005)
    sub.add_parser("migrate", help="bring the database schema up to date")
    p_fake = sub.add_parser("fake-llm", help="a local OpenAI-compatible fake model server")
    p_fake.add_argument("--host", default="127.0.0.1")
    p_fake.add_argument("--port", type=int, default=8099)
    p_fake.add_argument("--record", metavar="FILE", help="append each request body to FILE")
    p_chat = sub.add_parser(
        "chat",
        help="chat with a running server in this terminal",
        description="Stream a reply in the terminal. Without a message: an interactive "
        "loop. Ctrl-C during a reply stops the turn.",
    )
    p_chat.add_argument("message", nargs="?", help="send this one message, print the reply")
    p_chat.add_argument(
        "--url",
        default=os.environ.get("TURNRELAY_URL", "http://127.0.0.1:8000"),
        help="the server (env TURNRELAY_URL; default %(default)s)",
    )
    p_chat.add_argument(
        "--token",
        default=os.environ.get("TURNRELAY_TOKEN"),
        help="bearer token, one of TURNRELAY_API_KEYS (env TURNRELAY_TOKEN)",
    )
    p_chat.add_argument("--session", help="continue this session instead of a new one")
    p_chat.add_argument("--model", help="provider:model, one the server allows")
    args = parser.parse_args(argv)

    if args.command == "chat":
        from turnrelay import chat_client

        sys.exit(
            chat_client.run(args.url, args.token, args.session, args.message, model=args.model)
        )
    logs.configure("text")
    if args.command == "fake-llm":
        from turnrelay.devtools.fake_llm import serve

        serve(args.host, args.port, args.record)
        return
    try:
        settings = Settings()
        logs.configure(settings.log_format)
        if args.command in ("serve", "api"):
            _check_listening(settings, args.host)
        if args.command in ("serve", "api", "executor"):
            tracing.setup(settings.otel_endpoint, f"turnrelay-{args.command}")
        if args.command == "serve":
            from turnrelay.services import with_default_model

            asyncio.run(_serve(with_default_model(settings), args.host, args.port))
        elif args.command == "api":
            asyncio.run(_api(settings, args.host, args.port))
        elif args.command == "executor":
            asyncio.run(_executor(settings))
        elif args.command == "db-manager":
            asyncio.run(_db_manager(settings, args.host, args.port))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
    except SchemaOutOfDate as exc:
        print(f"turnrelay: {exc.detail}", file=sys.stderr)
        sys.exit(2)
    except (ConfigError, TurnrelayError) as exc:
        print(f"turnrelay: {exc.detail}", file=sys.stderr)
        sys.exit(2)
    except ValueError as exc:  # pydantic settings validation
        print(f"turnrelay: invalid settings: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
    finally:
        tracing.shutdown()  # flush the spans still buffered


if __name__ == "__main__":
    main()
