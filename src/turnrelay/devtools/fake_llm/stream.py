"""Streamed and deliberately broken responses, as raw ASGI apps.

``_Stream`` sends frames built by a wire module and records how the stream ended;
``_BrokenBody`` serves ``fail_after`` for a non-streamed reply. Both break the
connection by raising ``_AbruptClose`` after the response has started.
"""

from __future__ import annotations

import asyncio

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from turnrelay.devtools.fake_llm.record import _Recorder
from turnrelay.devtools.fake_llm.script import Script


class _AbruptClose(Exception):
    """Raised after the response has started: the ASGI server then drops the connection."""


class _Stream:
    """A streamed response: ``head`` frames, then ``body`` frames (paced by
    ``delay_ms``, cut by ``fail_after``), then ``tail`` frames. It notices a client
    going away while it waits."""

    def __init__(
        self,
        *,
        recorder: _Recorder,
        index: int,
        script: Script,
        head: list[bytes],
        body: list[bytes],
        tail: list[bytes],
    ) -> None:
        self.recorder = recorder
        self.index = index
        self.script = script
        self.head, self.body, self.tail = head, body, tail
        self._closed = False

    async def _stream(self, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for frame in self.head:
            await self._send(send, frame)
        delay = self.script.delay_ms / 1000
        fail_after = self.script.fail_after
        for i, frame in enumerate(self.body):
            if fail_after is not None and i >= fail_after:
                break
            if i and delay:
                await asyncio.sleep(delay)
            await self._send(send, frame)
        if fail_after is not None:
            if delay:
                await asyncio.sleep(delay)
            raise _AbruptClose
        for frame in self.tail:
            await self._send(send, frame)
        # Recorded before the body ends, so a client that has read the end finds the line.
        self._record_closed(completed=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _record_closed(self, *, completed: bool) -> None:
        if not self._closed:
            self._closed = True
            self.recorder.closed(self.index, completed=completed)

    @staticmethod
    async def _send(send: Send, data: bytes) -> None:
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
