"""The in-process EventLog: the embedded mode's twin of ``RedisEventLog``.

It keeps the Redis semantics that callers depend on: a batch is fenced as a
whole, by epoch and by seq (a stale batch writes nothing), an identical re-sent
batch is a no-op, the epoch outlives its log for the claim's ``ttl`` (as the
epoch key does in Redis), a log that passed its expiry time is absent
(``NotFound``, missing from ``read``), ``touch``/``expire`` on an absent log do
nothing, and a blocking ``read`` wakes on an append to any requested turn.
Expiry runs on the injectable clock; the ``block`` timeout of ``read`` is real
time, because it is a wait on the event loop rather than a retention policy.

Expired logs are freed, not just hidden: every ``PURGE_EVERY`` seconds of the
clock, the next operation drops every log and epoch past its expiry, so a
long-running ``serve`` holds only the logs still within their retention.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from turnrelay.clock import Clock, SystemClock
from turnrelay.errors import LogLost, NotFound, StaleWriter
from turnrelay.events.base import Frame, LogInfo, check_increasing

# How often (clock seconds) expired logs are freed.
PURGE_EVERY = 60.0


@dataclass(slots=True)
class _Log:
    frames: list[Frame] = field(default_factory=list)
    expires_at: float | None = None  # clock time; None keeps the log until deleted


@dataclass(slots=True)
class _Epoch:
    epoch: int
    base: int  # the log's last seq when this epoch claimed it
    expires_at: float


class MemoryEventLog:
    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._logs: dict[str, _Log] = {}
        self._epochs: dict[str, _Epoch] = {}
        self._next_purge = self._clock.now() + PURGE_EVERY
        # Notified on every append and wake; readers re-check their own turns.
        self._appended = asyncio.Condition()
        self._woken: set[str] = set()  # wake channels latched until a read takes them

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    @property
    def size(self) -> tuple[int, int]:
        """Logs and frames held (expired ones not yet freed included)."""
        return len(self._logs), sum(len(log.frames) for log in self._logs.values())

    @property
    def epochs(self) -> int:
        """Epoch fences held (expired ones not yet freed included)."""
        return len(self._epochs)

    def _purge(self, now: float) -> None:
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        for turn_id in [t for t, log in self._logs.items() if _expired(log.expires_at, now)]:
            del self._logs[turn_id]
        for turn_id in [t for t, e in self._epochs.items() if e.expires_at <= now]:
            del self._epochs[turn_id]

    def _live(self, turn_id: str) -> _Log | None:
        now = self._clock.now()
        self._purge(now)
        log = self._logs.get(turn_id)
        if log is not None and _expired(log.expires_at, now):
            del self._logs[turn_id]
            return None
        return log

    def _epoch(self, turn_id: str) -> _Epoch | None:
        current = self._epochs.get(turn_id)
        if current is not None and current.expires_at <= self._clock.now():
            del self._epochs[turn_id]
            return None
        return current

    async def claim(self, turn_id: str, epoch: int, ttl: float) -> LogInfo:
        log = self._live(turn_id)
        last = log.frames[-1].seq if log and log.frames else 0
        current = self._epoch(turn_id)
        if current is not None and current.epoch > epoch:
            raise StaleWriter(f"turn {turn_id}: epoch {epoch} is behind {current.epoch}")
        expires_at = self._clock.now() + ttl
        if current is None or current.epoch < epoch:
            self._epochs[turn_id] = _Epoch(epoch, last, expires_at)
        else:
            current.expires_at = max(current.expires_at, expires_at)
        if log is None:
            return LogInfo(first_seq=0, last_seq=0, terminal=False, exists=False)
        return _info(log)

    async def append(
        self,
        turn_id: str,
        frames: Sequence[Frame],
        *,
        epoch: int,
        ttl: float,
        restart: bool = False,
    ) -> None:
        if not frames:
            return
        check_increasing(turn_id, frames)
        log = self._live(turn_id)
        current = self._epoch(turn_id)
        if current is not None and current.epoch > epoch:
            raise StaleWriter(f"turn {turn_id}: epoch {epoch} is behind {current.epoch}")
        if log is None and frames[0].seq > 1 and not restart:
            raise LogLost(f"turn {turn_id}: the event log is gone before seq {frames[0].seq}")
        last = log.frames[-1].seq if log and log.frames else 0
        if frames[0].seq <= last:
            assert log is not None
            if (
                current is not None
                and current.epoch == epoch
                and frames[0].seq > current.base
                and frames[-1].seq <= last
                and _held(log, frames[0])
            ):
                return  # this writer's own batch, sent again after a lost reply
            raise StaleWriter(
                f"turn {turn_id}: frame seq {frames[0].seq} is not greater than {last}"
            )
        now = self._clock.now()
        if current is None or current.epoch < epoch:
            self._epochs[turn_id] = _Epoch(epoch, frames[0].seq - 1, now + ttl)
        else:
            current.expires_at = max(current.expires_at, now + ttl)
        if log is None:
            log = self._logs[turn_id] = _Log()
        log.frames.extend(frames)
        log.expires_at = now + ttl
        async with self._appended:
            self._appended.notify_all()

    async def info(self, turn_id: str) -> LogInfo:
        log = self._live(turn_id)
        if log is None:
            raise NotFound(f"turn {turn_id} has no event log")
        return _info(log)

    def _ready(self, cursors: Mapping[str, int], count: int) -> dict[str, list[Frame]]:
        # One clock reading per read, not per cursor: the stream hub reads every
        # followed turn at once, hundreds of them, for each batch of frames.
        now = self._clock.now()
        self._purge(now)
        result: dict[str, list[Frame]] = {}
        logs = self._logs
        for turn_id, after in cursors.items():
            log = logs.get(turn_id)
            if log is None or not log.frames or log.frames[-1].seq <= after:
                continue  # nothing new (an expired log is freed by the next _live)
            if _expired(log.expires_at, now):
                continue
            start = bisect.bisect_right(log.frames, after, key=lambda f: f.seq)
            if start < len(log.frames):
                result[turn_id] = log.frames[start : start + count]
        return result

    async def read(
        self,
        cursors: Mapping[str, int],
        *,
        block: float | None = None,
        count: int = 500,
        wake: str | None = None,
    ) -> dict[str, list[Frame]]:
        ready = self._ready(cursors, count)
        if ready or not block or block <= 0 or self._take(wake):
            return ready
        try:
            async with asyncio.timeout(block), self._appended:
                while not (ready := self._ready(cursors, count)):
                    if self._take(wake):
                        break
                    await self._appended.wait()
        except TimeoutError:
            return {}
        return ready

    def _take(self, wake: str | None) -> bool:
        if wake is None or wake not in self._woken:
            return False
        self._woken.discard(wake)
        return True

    async def wake(self, channel: str) -> None:
        self._woken.add(channel)
        async with self._appended:
            self._appended.notify_all()

    async def touch(self, turn_id: str, ttl: float) -> bool:
        log = self._live(turn_id)
        expires_at = self._clock.now() + ttl
        current = self._epoch(turn_id)
        if current is not None:
            current.expires_at = max(current.expires_at, expires_at)
        if log is None:
            return False
        log.expires_at = expires_at
        return True

    async def expire(self, turn_id: str, retention: float) -> None:
        await self.touch(turn_id, retention)

    async def delete(self, turn_id: str) -> None:
        self._logs.pop(turn_id, None)
        self._epochs.pop(turn_id, None)

    async def ping(self) -> None:
        pass


def _expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and now >= expires_at


def _info(log: _Log) -> LogInfo:
    if not log.frames:
        return LogInfo(first_seq=0, last_seq=0, terminal=False)
    last = log.frames[-1]
    return LogInfo(first_seq=log.frames[0].seq, last_seq=last.seq, terminal=last.terminal)


def _held(log: _Log, frame: Frame) -> bool:
    """The log holds exactly ``frame`` at its seq."""
    index = bisect.bisect_left(log.frames, frame.seq, key=lambda f: f.seq)
    return index < len(log.frames) and log.frames[index] == frame
