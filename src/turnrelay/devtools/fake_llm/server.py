"""Running the fake server: ``serve`` and ``main`` in the foreground, ``FakeLLM``
in the current event loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from turnrelay.devtools.fake_llm.app import build_app
from turnrelay.devtools.fake_llm.stream import _AbruptClose

DEFAULT_PORT = 8099


class _QuietAbruptClose(logging.Filter):
    """Keeps uvicorn from logging a traceback for a ``fail_after`` we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _AbruptClose))


def _quiet_uvicorn() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietAbruptClose) for f in logger.filters):
        logger.addFilter(_QuietAbruptClose())


def _config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    _quiet_uvicorn()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=1,
    )


def _bound_port(server: uvicorn.Server) -> int:
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return port


class _AnnouncingServer(uvicorn.Server):
    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(
                f"fake-llm listening on http://{self.config.host}:{_bound_port(self)}", flush=True
            )


def serve(host: str, port: int, record_path: str | None) -> None:
    """Run the server until interrupted; prints ``fake-llm listening on http://HOST:PORT``
    (the real port when ``port`` is 0) once it accepts connections."""
    _AnnouncingServer(_config(build_app(record_path), host, port)).run()


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The host process owns the signals; FakeLLM.__aexit__ stops this server.
        yield


class FakeLLM:
    """The fake server in the current event loop, on a free port::

    async with FakeLLM(record_path=path) as llm:
        client = AsyncOpenAI(base_url=llm.base_url, api_key="unused")
    """

    def __init__(self, record_path: str | None = None, host: str = "127.0.0.1") -> None:
        self.record_path = record_path
        self.host = host
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url``, ``/v1`` included."""
        return f"http://{self.host}:{self.port}/v1"

    async def __aenter__(self) -> FakeLLM:
        server = _EmbeddedServer(_config(build_app(self.record_path), self.host, 0))
        self._server = server
        self._task = asyncio.create_task(server.serve())
        while not server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("fake-llm did not start")
            await asyncio.sleep(0.01)
        self.port = _bound_port(server)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        await self._task


def main(argv: list[str] | None = None) -> None:
    # The package docstring is the directive reference; its first paragraph describes the CLI.
    from turnrelay.devtools import fake_llm

    description = (fake_llm.__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="fake-llm", description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--record", metavar="FILE", help="append requests as JSON lines")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.record)
