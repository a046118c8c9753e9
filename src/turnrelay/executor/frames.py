"""FrameWriter: numbers a turn's chunks and appends them to the event log.

Writes are batched without adding latency: the first chunk is written at once;
chunks that arrive while a write is in flight wait in a buffer and go out
together in the next ``append`` (one round trip), with consecutive deltas of the
same text or reasoning part coalesced into one frame. A model that streams
faster than the log accepts therefore costs fewer, larger writes, and a slow
model costs nothing extra.

``seq`` numbers are assigned when a batch is written, continuing from the log's
last frame (a retried attempt continues the sequence). Every append carries
the writer's epoch (the attempt it writes for, which its runner claimed the log
with before reading where it ends): a ``StaleWriter`` from the log means a
newer attempt owns the turn now, and the writer stops and re-raises it to
whoever flushes next.

Redis may restart empty under a running turn. While the log is unreachable the
same batch is sent again (``OUTAGE_BUDGET``): appends are idempotent within an
epoch, so a batch that landed before its reply was lost is not written twice,
and the rightful writer is never called stale for it. When the log turns out to
be gone (``LogLost`` on an append, or ``restore()`` after the heartbeat found
it missing during a silent stretch), the writer restarts it at the next ``seq``
with a ``data-stream-reset`` frame and a snapshot of the message so far, so a
reader that was caught up rebuilds the message, and older cursors answer 410.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from turnrelay.errors import BackendUnavailable, LogLost, StaleWriter
from turnrelay.events import chunks as wire
from turnrelay.events.base import EventLog, Frame
from turnrelay.events.chunks import Chunk

log = logging.getLogger(__name__)

_COALESCE = {"text-delta", "reasoning-delta"}
_CLOSING = {"error", "abort", "finish"}
# How long a writer keeps retrying while the log is unreachable before it gives
# up (and the turn fails): about a Redis restart, well under the lease TTL x 4.
OUTAGE_BUDGET = 30.0


class FrameWriter:
    def __init__(
        self,
        log: EventLog,
        turn_id: str,
        next_seq: int,
        *,
        epoch: int,
        ttl: float,
        on_written: Callable[[int], None] | None = None,
        snapshot: Callable[[], list[Chunk]] | None = None,
        restart: bool = False,
    ) -> None:
        self._log = log
        self._turn_id = turn_id
        self._next_seq = next_seq
        self._epoch = epoch
        self._ttl = ttl  # every append keeps the log this long
        self._buffer: list[Chunk] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_written = on_written
        # The chunks that rebuild the message so far (for a restarted log).
        self._snapshot = snapshot
        # The first append starts a new log mid-sequence (see EventLog.append).
        self._restart_next = restart
        # The log vanished while nothing was being written: restart it now.
        self._lost = False
        # Called once when a newer epoch fences this writer out, so its run can
        # stop at once rather than at its next chunk or heartbeat.
        self.on_fenced: Callable[[], None] | None = None

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

    def restore(self) -> None:
        """The log is gone (the heartbeat's touch found nothing): restart it at
        the next seq with a reset and the snapshot, without waiting for the
        next chunk, which may be minutes away during a silent tool call."""
        if self._error is not None or self._snapshot is None:
            return
        self._lost = True
        self._idle.clear()
        self._wakeup.set()
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name=f"frames:{self._turn_id}")

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
            try:
                if self._lost:
                    self._lost = False
                    await self._restart([])
                batch, self._buffer = self._buffer, []
                if batch:
                    await self._append(self._number(batch), restart=self._restart_next)
                    self._restart_next = False
            except Exception as exc:  # the writer is dead; flush() reports it
                self._error = exc
                self._idle.set()
                if isinstance(exc, StaleWriter) and self.on_fenced is not None:
                    self.on_fenced()
                return
            if not self._buffer:
                self._idle.set()

    def _number(self, batch: list[Chunk]) -> list[Frame]:
        frames = []
        for chunk in batch:
            frames.append(Frame(self._next_seq, wire.encode(chunk), wire.is_terminal(chunk)))
            self._next_seq += 1
        return frames

    async def _append(self, frames: list[Frame], *, restart: bool = False) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OUTAGE_BUDGET
        delay = 0.1
        while True:
            try:
                await self._log.append(
                    self._turn_id, frames, epoch=self._epoch, ttl=self._ttl, restart=restart
                )
                break
            except LogLost:
                if restart or self._snapshot is None:
                    raise
                await self._restart(frames)
                return
            except BackendUnavailable:
                # It may have landed: sending the same batch again is safe.
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if self._on_written is not None:
            self._on_written(len(frames))

    async def _restart(self, lost: list[Frame]) -> None:
        """The log vanished: start it again where ``lost`` should have gone, with a
        reset and a snapshot of the message so far. The snapshot already holds
        every content chunk fed so far (the lost batch and the buffer); only the
        closing chunks (``error``, ``abort``, ``finish``) are carried over."""
        assert self._snapshot is not None
        seq = lost[0].seq if lost else self._next_seq
        log.warning("turn %s: event log lost; restarting it at seq %d", self._turn_id, seq)
        pending = [json.loads(f.data) for f in lost] + self._buffer
        self._buffer = []
        closing = [c for c in pending if c["type"] in _CLOSING]
        self._next_seq = seq
        rebuilt = [wire.data("stream-reset", {"seq": seq}, transient=True), *self._snapshot()]
        await self._append(self._number([*rebuilt, *closing]), restart=True)
