"""StreamHub: one multiplexed event-log reader per API process.

Every SSE client subscribes here with its turn and cursor. A single task reads
all subscribed turns in one blocking ``read`` (Redis: one ``XREAD BLOCK`` over
all streams) from the lowest cursor per turn and fans frames out in process, so
an API process holds one blocking Redis connection however many clients it
serves.

Each subscriber is handed frames **contiguously**: only the frame right after
its cursor. A frame further on is either held back (the read started at
another subscriber's cursor, so the next read, from the lowest cursor, brings
what is missing) or, when the read started at this subscriber's own cursor,
proof of a hole in the log: a restarted log (its first frame is a
``data-stream-reset``, handed over, the client rebuilds from it) or frames
trimmed away (the subscriber ends with ``Gone``; reconnecting with its cursor
answers 410). Nobody sees a gap or a repeat.

A new subscriber whose frames the blocked read does not cover wakes it through
the log's wake channel instead of cancelling it (cancelling makes redis-py drop
the connection, and a stream of new clients would starve every reader).

Each subscriber's buffer is bounded: a client that stops reading is dropped
(``SlowReader``) and resumes with its cursor; the log still has every frame.
Streams per user are capped per process (``UserStreams``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable

from turnrelay.errors import BackendUnavailable, Gone, RateLimited, TurnrelayError
from turnrelay.events.base import EventLog, Frame
from turnrelay.events.chunks import is_reset
from turnrelay.waiters import release

log = logging.getLogger(__name__)

_BLOCK = 5.0  # seconds a read blocks before it is reissued
# After a read that brought frames of several turns (many streams are busy),
# the next read starts this much later, so it brings the frames of that time
# in one round trip. Each read costs in proportion to the turns followed (Redis
# packs and answers a key per stream), so under load reads were most of the
# API's CPU; a frame waits at most this long, and a lone stream never does.
COALESCE = 0.002
# Frames a subscriber may have waiting; beyond it the client is too slow and
# is dropped (it resumes from its cursor, so nothing is lost).
SUBSCRIBER_BUFFER = 2048


class StreamClosed(Exception):
    """This API process is shutting down: the client should resume elsewhere."""


class SlowReader(StreamClosed):
    """The client fell a whole buffer behind: it resumes with its cursor."""


class Subscription:
    __slots__ = ("_buffer", "_waiter", "cursor", "ended", "turn_id")

    def __init__(self, turn_id: str, cursor: int) -> None:
        self.turn_id = turn_id
        self.cursor = cursor  # the last seq handed to this subscriber
        self._buffer: deque[Frame | BaseException] = deque()
        # The reader's wait in ``next``: a bare future and a timer, not
        # ``wait_for`` (a task per frame per stream).
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False  # failed: takes no more frames, holds no read back

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def push(self, frame: Frame) -> bool:
        """Hand over the frame after the cursor; False when the buffer was full."""
        if self.ended:
            return False
        if len(self._buffer) >= SUBSCRIBER_BUFFER:
            self.fail(SlowReader(f"turn {self.turn_id}: reader fell behind at {self.cursor}"))
            return False
        self._buffer.append(frame)
        self.cursor = frame.seq
        self._wake()
        return True

    def fail(self, exc: BaseException) -> None:
        """End this subscription with ``exc`` once the frames before it are read."""
        if self.ended:
            return
        self.ended = True
        self._buffer.append(exc)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            release(self._waiter)

    def next_ready(self) -> Frame | None:
        """The next frame if one is already here (never an error: ``next``
        raises those, after the frames before them)."""
        if self._buffer and not isinstance(self._buffer[0], BaseException):
            item = self._buffer.popleft()
            assert not isinstance(item, BaseException)
            return item
        return None

    async def next(self, timeout: float) -> Frame | None:
        """The next frame, or ``None`` when ``timeout`` passes first (time to ping)."""
        if not self._buffer:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, release, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._buffer:
                return None  # the timeout
        item = self._buffer.popleft()
        if isinstance(item, BaseException):
            raise item
        return item


class UserStreams:
    """How many streams each user has open in this process, capped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def open(self, user_id: str) -> Callable[[], None]:
        """Count one more stream for ``user_id``; the returned call (idempotent)
        releases it. Raises ``RateLimited`` at the cap."""
        count = self._open.get(user_id, 0)
        if count >= self.limit:
            raise RateLimited(
                f"too many open streams: {count} of {self.limit}; close one and retry",
                code="too_many_streams",
            )
        self._open[user_id] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._open.get(user_id, 1) - 1
            if left > 0:
                self._open[user_id] = left
            else:
                self._open.pop(user_id, None)

        return release

    def count(self, user_id: str) -> int:
        return self._open.get(user_id, 0)


class StreamHub:
    def __init__(self, events: EventLog) -> None:
        self._events = events
        self._subs: dict[str, set[Subscription]] = {}
        # Per followed turn, the lowest cursor of its live subscribers: where the
        # next read starts. Kept up to date as cursors move (only the turns a
        # read brought frames for), not rebuilt over every turn for every read.
        self._cursors: dict[str, int] = {}
        self._changed = asyncio.Event()  # a subscriber arrived while none was read
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._channel = uuid.uuid4().hex  # this process's wake channel
        self._reading: dict[str, int] | None = None  # the blocked read's cursors
        self._wake_sent = False  # a wake is on its way to the blocked read

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End every subscription now (SIGTERM): each stream stops without
        ``[DONE]``, so its client reconnects with its cursor to another replica."""
        self._closed = True
        for subs in self._subs.values():
            for sub in subs:
                sub.fail(StreamClosed())
        self._cursors.clear()  # ended, they hold no read back

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
        self._recount(turn_id)
        try:
            await self._cover(turn_id, after)
            yield sub
        finally:
            group = self._subs.get(turn_id)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._subs[turn_id]
            self._recount(turn_id)

    def _recount(self, turn_id: str) -> None:
        """Where reads of ``turn_id`` start: its live subscribers' lowest cursor
        (an ended one holds no read back); not read at all without one."""
        live = [s.cursor for s in self._subs.get(turn_id, ()) if not s.ended]
        if live:
            self._cursors[turn_id] = min(live)
        else:
            self._cursors.pop(turn_id, None)

    async def _cover(self, turn_id: str, after: int) -> None:
        """Make sure a read from ``after`` comes soon: the blocked one covers it,
        or it is woken (once, however many subscribers arrive meanwhile)."""
        reading = self._reading
        if reading is None:
            self._changed.set()  # the pump is between reads or idle
            return
        if turn_id in reading and reading[turn_id] <= after:
            return
        if self._wake_sent:
            return
        self._wake_sent = True
        try:
            await self._events.wake(self._channel)
        except TurnrelayError as exc:
            # The blocked read fails the same way, or times out within _BLOCK.
            self._wake_sent = False
            log.warning("stream hub wake failed: %s", exc.detail)

    async def _pump(self) -> None:
        while True:
            if not self._subs:
                self._changed.clear()
                await self._changed.wait()
                continue
            cursors = dict(self._cursors)  # this read's; handovers move the live ones
            if not cursors:  # only ended subscribers, waiting for their clients to go
                self._changed.clear()
                await self._changed.wait()
                continue
            self._changed.clear()
            self._reading = cursors
            try:
                batches = await self._events.read(cursors, block=_BLOCK, wake=self._channel)
            except TurnrelayError as exc:
                log.warning("stream hub read failed: %s", exc.detail)
                for subs in self._subs.values():
                    for sub in subs:
                        sub.fail(exc)
                self._subs.clear()
                self._cursors.clear()
                await asyncio.sleep(0.5)
                continue
            finally:
                self._reading = None
                self._wake_sent = False
            for turn_id, frames in batches.items():
                for sub in list(self._subs.get(turn_id, ())):
                    _hand_over(sub, frames, read_from=cursors[turn_id])
                self._recount(turn_id)
            if len(batches) > 1:
                await asyncio.sleep(COALESCE)


def _hand_over(sub: Subscription, frames: list[Frame], *, read_from: int) -> None:
    """Give ``sub`` the frames right after its cursor (see the module docstring)."""
    for frame in frames:
        if frame.seq <= sub.cursor:
            continue
        if frame.seq != sub.cursor + 1:
            if sub.cursor != read_from or frame is not frames[0]:
                return  # read from a lower cursor: the next read brings the rest
            if sub.cursor > 0 and not is_reset(frame.data):
                sub.fail(Gone(f"turn {sub.turn_id}: frames after {sub.cursor} are no longer kept"))
                return
        if not sub.push(frame):
            return
