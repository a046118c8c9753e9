"""StreamHub: one multiplexed event-log reader per API process.

Every SSE client subscribes here with its turn and cursor. A single task reads
all subscribed turns in one blocking ``read`` (Redis: one ``XREAD BLOCK`` over
all streams) from the lowest cursor per turn and fans frames out in process, so
an API process holds one blocking Redis connection however many clients it
serves. A subscriber with an older cursor lowers its turn's read position; the
others skip what they already have, so nobody sees a gap or a repeat.

When the subscription set changes, the blocked read is cancelled and reissued
with the new streams, so a new client's first frame is not held up by the
block timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from turnrelay.errors import BackendUnavailable, TurnrelayError
from turnrelay.events.base import EventLog, Frame

log = logging.getLogger(__name__)

_BLOCK = 5.0  # seconds a read blocks before it is reissued


class StreamClosed(Exception):
    """This API process is shutting down: the client should resume elsewhere."""


class Subscription:
    __slots__ = ("cursor", "frames", "turn_id")

    def __init__(self, turn_id: str, cursor: int) -> None:
        self.turn_id = turn_id
        self.cursor = cursor  # the last seq handed to this subscriber
        self.frames: asyncio.Queue[Frame | BaseException] = asyncio.Queue()

    async def next(self, timeout: float) -> Frame | None:
        """The next frame, or ``None`` when ``timeout`` passes first (time to ping)."""
        try:
            item = await asyncio.wait_for(self.frames.get(), timeout)
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


class StreamHub:
    def __init__(self, events: EventLog) -> None:
        self._events = events
        self._subs: dict[str, set[Subscription]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End every subscription now (SIGTERM): each stream stops without
        ``[DONE]``, so its client reconnects with its cursor to another replica."""
        self._closed = True
        for subs in self._subs.values():
            for sub in subs:
                sub.frames.put_nowait(StreamClosed())

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name="stream-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    @contextlib.asynccontextmanager
    async def subscribe(self, turn_id: str, after: int) -> AsyncIterator[Subscription]:
        """Frames of ``turn_id`` with ``seq > after``, live, for the block's duration."""
        if self._closed:
            raise BackendUnavailable("this API process is shutting down; retry")
        await self.start()
        sub = Subscription(turn_id, after)
        self._subs.setdefault(turn_id, set()).add(sub)
        self._changed.set()
        try:
            yield sub
        finally:
            group = self._subs.get(turn_id)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._subs[turn_id]

    async def _pump(self) -> None:
        while True:
            if not self._subs:
                self._changed.clear()
                await self._changed.wait()
                continue
            cursors = {t: min(s.cursor for s in subs) for t, subs in self._subs.items()}
            self._changed.clear()
            read = asyncio.ensure_future(self._events.read(cursors, block=_BLOCK))
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait([read, changed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            if not read.done():
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await read
                continue
            try:
                batches = read.result()
            except TurnrelayError as exc:
                log.warning("stream hub read failed: %s", exc.detail)
                for subs in self._subs.values():
                    for sub in subs:
                        sub.frames.put_nowait(exc)
                self._subs.clear()
                await asyncio.sleep(0.5)
                continue
            for turn_id, frames in batches.items():
                for sub in self._subs.get(turn_id, ()):
                    for frame in frames:
                        if frame.seq > sub.cursor:
                            sub.frames.put_nowait(frame)
                            sub.cursor = frame.seq
