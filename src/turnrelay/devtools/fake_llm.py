"""A local OpenAI-compatible chat completions server with scripted, deterministic replies.

Tests, demos and benchmarks point an OpenAI client (``base_url=http://HOST:PORT/v1``)
at it. It answers ``POST /v1/chat/completions`` (streaming SSE and plain JSON) and
``GET /v1/models``. The reply is ``Echo: <last user text>`` unless directives in the
last user message say otherwise; directives are stripped from the echoed text and
may be combined:

    fake:tokens=N        reply ``t0 t1 … t(N-1)``, one chunk per token
    fake:reasoning=N     first stream ``r0 r1 …`` as ``delta.reasoning_content``
    fake:delay_ms=D      pause D ms between chunks
    fake:fail_after=N    stream N chunks, then break the connection (no ``[DONE]``)
    fake:error=STATUS    answer HTTP STATUS with an OpenAI-shaped error body

With a record file, every request is appended as one JSON line
``{"event": "request", "request_index", "path", "t", "body"}`` and every streamed
response, when it ends, as ``{"event": "closed", "request_index", "t", "completed"}``:
``completed`` is false when the client went away or ``fail_after`` broke the stream,
so a test can prove that a model stream was closed. ``t`` is ``time.monotonic()``
(system-wide on Linux, comparable across processes). Each line is one unbuffered
append, so readers never see half a line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

DEFAULT_PORT = 8099
MODEL_ID = "fake"

_DIRECTIVE = re.compile(r"fake:(tokens|reasoning|delay_ms|fail_after|error)=(\S*)")
_PIECE = re.compile(r"\s*\S+")


class _AbruptClose(Exception):
    """Raised after the response has started: the ASGI server then drops the connection."""


class _QuietAbruptClose(logging.Filter):
    """Keeps uvicorn from logging a traceback for a ``fail_after`` we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _AbruptClose))


def _quiet_uvicorn() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietAbruptClose) for f in logger.filters):
        logger.addFilter(_QuietAbruptClose())


@dataclass(frozen=True, slots=True)
class Script:
    """What the directives of one request ask for."""

    tokens: int | None = None
    reasoning: int = 0
    delay_ms: int = 0
    fail_after: int | None = None
    error: int | None = None


def parse_directives(text: str) -> tuple[str, Script]:
    """The text without its directives (whitespace collapsed), and the script."""
    values: dict[str, int] = {}
    for name, raw in _DIRECTIVE.findall(text):
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"fake:{name} needs an integer, got {raw!r}") from None
        if values[name] < 0:
            raise ValueError(f"fake:{name} must not be negative")
    clean = " ".join(_DIRECTIVE.sub(" ", text).split())
    return clean, Script(**values)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _message_text(message.get("content"))
    return ""


def _reply_pieces(clean: str, script: Script) -> list[str]:
    if script.tokens is not None:
        return [f"t{i}" if i == 0 else f" t{i}" for i in range(script.tokens)]
    # Word by word, so even a short echo streams as several deltas.
    return _PIECE.findall(f"Echo: {clean}" if clean else "Echo:")


def _error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(_error_body(status, message, kind), status_code=status)


class _Recorder:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._counter = itertools.count()

    def request(self, path: str, body: Any) -> int:
        index = next(self._counter)
        self._write({"event": "request", "request_index": index, "path": path, "body": body})
        return index

    def closed(self, index: int, *, completed: bool) -> None:
        self._write({"event": "closed", "request_index": index, "completed": completed})

    def _write(self, line: dict[str, Any]) -> None:
        if self.path is None:
            return
        line["t"] = time.monotonic()
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        # One unbuffered append per line: concurrent readers see whole lines only.
        with open(self.path, "ab", buffering=0) as file:
            file.write(data)


def _usage(prompt_chars: int, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = max(1, prompt_chars // 4)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _ChatStream:
    """A streamed chat completion that notices a client going away while it waits."""

    def __init__(
        self,
        *,
        recorder: _Recorder,
        index: int,
        model: str,
        reasoning: list[str],
        pieces: list[str],
        script: Script,
        usage: dict[str, int] | None,
    ) -> None:
        self.recorder = recorder
        self.index = index
        self.script = script
        self.usage = usage
        self._closed = False
        base = {
            "id": f"chatcmpl-fake-{index}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        if usage is not None:
            base["usage"] = None  # as OpenAI does: null on every chunk but the last
        self._base = base
        self.deltas = [{"reasoning_content": text} for text in reasoning]
        self.deltas += [{"content": text} for text in pieces]

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**self._base, "choices": [choice]})

    async def _stream(self, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._body(send, self._chunk({"role": "assistant", "content": ""}))
        delay = self.script.delay_ms / 1000
        fail_after = self.script.fail_after
        for i, delta in enumerate(self.deltas):
            if fail_after is not None and i >= fail_after:
                break
            if i and delay:
                await asyncio.sleep(delay)
            await self._body(send, self._chunk(delta))
        if fail_after is not None:
            if delay:
                await asyncio.sleep(delay)
            raise _AbruptClose
        await self._body(send, self._chunk({}, "stop"))
        if self.usage is not None:
            await self._body(send, _sse({**self._base, "choices": [], "usage": self.usage}))
        await self._body(send, b"data: [DONE]\n\n")
        # Recorded before the body ends, so a client that has read [DONE] finds the line.
        self._record_closed(completed=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _record_closed(self, *, completed: bool) -> None:
        if not self._closed:
            self._closed = True
            self.recorder.closed(self.index, completed=completed)

    @staticmethod
    async def _body(send: Send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streamer = asyncio.ensure_future(self._stream(send))
        watcher = asyncio.ensure_future(self._wait_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streamer, watcher):
                task.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            self._record_closed(completed=False)
        if not streamer.cancelled() and isinstance(streamer.exception(), _AbruptClose):
            raise _AbruptClose


class _BrokenBody(Response):
    """Promises a full body, sends half of it, then drops the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        half = self.body[: len(self.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        raise _AbruptClose


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def build_app(record_path: str | None = None) -> Starlette:
    """The fake server as an ASGI app; ``record_path`` appends JSON lines (see above)."""
    recorder = _Recorder(record_path)

    async def models(request: Request) -> Response:
        recorder.request(request.url.path, None)
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "turnrelay"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            recorder.request(request.url.path, None)
            return _error(400, "request body is not JSON")
        index = recorder.request(request.url.path, body)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        try:
            clean, script = parse_directives(_last_user_text(messages))
        except ValueError as exc:
            return _error(400, str(exc))
        if script.error is not None:
            status = script.error if 400 <= script.error <= 599 else 500
            kind = "server_error" if status >= 500 else "invalid_request_error"
            return _error(status, f"fake error {status} (fake:error directive)", kind)

        model = str(body.get("model") or MODEL_ID)
        reasoning = [f"r{i}" if i == 0 else f" r{i}" for i in range(script.reasoning)]
        pieces = _reply_pieces(clean, script)
        prompt_chars = sum(
            len(_message_text(m.get("content"))) for m in messages if isinstance(m, dict)
        )
        usage = _usage(prompt_chars, len(reasoning) + len(pieces))

        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return _ChatStream(  # type: ignore[return-value]
                recorder=recorder,
                index=index,
                model=model,
                reasoning=reasoning,
                pieces=pieces,
                script=script,
                usage=usage if include_usage else None,
            )

        if script.delay_ms:
            await asyncio.sleep(script.delay_ms * max(0, len(pieces) - 1) / 1000)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        completion = {
            "id": f"chatcmpl-fake-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": usage,
        }
        if script.fail_after is not None:
            return _BrokenBody(json.dumps(completion), media_type="application/json")
        return JSONResponse(completion)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )


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
    parser = argparse.ArgumentParser(prog="fake-llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--record", metavar="FILE", help="append requests as JSON lines")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.record)


if __name__ == "__main__":
    main()
