"""FrameWriter: numbers a turn's chunks and appends them to the event log.

Writes are batched without adding latency: the first chunk is written at once;
chunks that arrive while a write is in flight wait in a buffer and go out
together in the next ``append`` (one round trip), with consecutive deltas of the
same text or reasoning part coalesced into one frame. A model that streams
faster than the log accepts therefore costs fewer, larger writes, and a slow
model costs nothing extra.

``seq`` numbers are assigned when a batch is written, continuing from the log's
last frame (a retried attempt continues the sequence). A ``StaleWriter`` from
the log means another executor owns the turn now: the writer stops and
re-raises it to whoever flushes next.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from turnrelay.events import chunks as wire
from turnrelay.events.base import EventLog, Frame
from turnrelay.events.chunks import Chunk

_COALESCE = {"text-delta", "reasoning-delta"}


class FrameWriter:
    def __init__(
        self,
        log: EventLog,
        turn_id: str,
        next_seq: int,
        *,
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        self._log = log
        self._turn_id = turn_id
        self._next_seq = next_seq
        self._buffer: list[Chunk] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_written = on_written

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def add(self, *chunks: Chunk) -> None:
        if self._error is not None:
            raise self._error
        if not chunks:
            return
        for chunk in chunks:
            prev = self._buffer[-1] if self._buffer else None
            if (
                prev is not None
                and chunk["type"] in _COALESCE
                and prev["type"] == chunk["type"]
                and prev["id"] == chunk["id"]
            ):
                self._buffer[-1] = {**prev, "delta": prev["delta"] + chunk["delta"]}
            else:
                self._buffer.append(chunk)
        self._idle.clear()
        self._wakeup.set()
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name=f"frames:{self._turn_id}")

    async def flush(self) -> None:
        """Wait until everything added so far is in the log."""
        await self._idle.wait()
        if self._error is not None:
            raise self._error

    async def write_now(self, *chunks: Chunk) -> None:
        self.add(*chunks)
        await self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _pump(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._buffer = self._buffer, []
            if batch:
                frames = []
                for chunk in batch:
                    frames.append(
                        Frame(self._next_seq, wire.encode(chunk), chunk["type"] == wire.FINISH)
                    )
                    self._next_seq += 1
                try:
                    await self._log.append(self._turn_id, frames)
                except Exception as exc:  # the writer is dead; flush() reports it
                    self._error = exc
                    self._idle.set()
                    return
                if self._on_written is not None:
                    self._on_written(len(frames))
            if not self._buffer:
                self._idle.set()
