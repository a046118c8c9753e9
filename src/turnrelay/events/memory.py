"""The in-process EventLog: the embedded mode's twin of ``RedisEventLog``.

It keeps the Redis semantics that callers depend on: a batch is fenced as a
whole (a stale batch writes nothing), a log that passed its expiry time is
absent (``NotFound``, missing from ``read``), ``touch``/``expire`` on an absent
log do nothing, and a blocking ``read`` wakes on an append to any requested turn.
Expiry runs on the injectable clock; the ``block`` timeout of ``read`` is real
time, because it is a wait on the event loop rather than a retention policy.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from turnrelay.clock import Clock, SystemClock
from turnrelay.errors import LogLost, NotFound, StaleWriter
from turnrelay.events.base import Frame, LogInfo


@dataclass(slots=True)
class _Log:
    frames: list[Frame] = field(default_factory=list)
    expires_at: float | None = None  # clock time; None keeps the log until deleted


def _check_batch(turn_id: str, frames: Sequence[Frame], last_seq: int) -> None:
    """Raise ``StaleWriter`` unless every ``seq`` exceeds the one before it,
    starting above ``last_seq``; checked before anything is written."""
    previous = last_seq
    for frame in frames:
        if frame.seq <= previous:
            raise StaleWriter(
                f"turn {turn_id}: frame seq {frame.seq} is not greater than {previous}"
            )
        previous = frame.seq


class MemoryEventLog:
    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._logs: dict[str, _Log] = {}
        # Notified on every append; readers re-check their own turns.
        self._appended = asyncio.Condition()

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def _live(self, turn_id: str) -> _Log | None:
        log = self._logs.get(turn_id)
        if log is not None and log.expires_at is not None and self._clock.now() >= log.expires_at:
            del self._logs[turn_id]
            return None
        return log

    async def append(self, turn_id: str, frames: Sequence[Frame], *, restart: bool = False) -> None:
        if not frames:
            return
        log = self._live(turn_id)
        if log is None and frames[0].seq > 1 and not restart:
            raise LogLost(f"turn {turn_id}: the event log is gone before seq {frames[0].seq}")
        _check_batch(turn_id, frames, log.frames[-1].seq if log and log.frames else 0)
        if log is None:
            log = self._logs[turn_id] = _Log()
        log.frames.extend(frames)
        async with self._appended:
            self._appended.notify_all()

    async def info(self, turn_id: str) -> LogInfo:
        log = self._live(turn_id)
        if log is None:
            raise NotFound(f"turn {turn_id} has no event log")
        if not log.frames:
            return LogInfo(first_seq=0, last_seq=0, terminal=False)
        last = log.frames[-1]
        return LogInfo(first_seq=log.frames[0].seq, last_seq=last.seq, terminal=last.terminal)

    def _ready(self, cursors: Mapping[str, int], count: int) -> dict[str, list[Frame]]:
        result: dict[str, list[Frame]] = {}
        for turn_id, after in cursors.items():
            log = self._live(turn_id)
            if log is None:
                continue
            start = bisect.bisect_right(log.frames, after, key=lambda f: f.seq)
            if start < len(log.frames):
                result[turn_id] = log.frames[start : start + count]
        return result

    async def read(
        self, cursors: Mapping[str, int], *, block: float | None = None, count: int = 500
    ) -> dict[str, list[Frame]]:
        ready = self._ready(cursors, count)
        if ready or not block or block <= 0:
            return ready
        try:
            async with asyncio.timeout(block), self._appended:
                while not (ready := self._ready(cursors, count)):
                    await self._appended.wait()
        except TimeoutError:
            return {}
        return ready

    async def touch(self, turn_id: str, ttl: float) -> None:
        log = self._live(turn_id)
        if log is not None:
            log.expires_at = self._clock.now() + ttl

    async def expire(self, turn_id: str, retention: float) -> None:
        await self.touch(turn_id, retention)

    async def delete(self, turn_id: str) -> None:
        self._logs.pop(turn_id, None)

    async def ping(self) -> None:
        pass
