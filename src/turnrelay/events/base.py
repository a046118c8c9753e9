"""The EventLog port.

A turn's log is a sequence of frames numbered ``1, 2, 3 …`` (``seq``). A retried
attempt continues the sequence. ``append`` is fenced: a frame whose ``seq`` is not
greater than the log's last one raises ``StaleWriter`` (in Redis the explicit
entry id ``0-<seq>`` gives this for free), so a writer that lost its lease can
never interleave frames with the new owner.

Continuity is fenced too: appending a frame with ``seq > 1`` to a log that does
not exist raises ``LogLost`` (Redis restarted without its data, or the log
expired), unless ``restart=True`` says the writer knows and is restarting the
log mid-sequence (with a ``data-stream-reset`` frame first).

The frame whose chunk type is ``finish`` ends the turn's stream; readers stop
after it. A log ``expire``s ``retention`` seconds after the turn ends; the
executor's heartbeat ``touch``es it meanwhile so a long silent tool call never
expires a live turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Frame:
    """One log entry: a UI message stream chunk, already JSON-encoded."""

    seq: int
    data: str
    terminal: bool = False  # True for the ``finish`` chunk, the stream's last frame


@dataclass(frozen=True, slots=True)
class LogInfo:
    first_seq: int  # 0 when the log exists but holds no frame
    last_seq: int
    terminal: bool  # the last frame is the ``finish`` frame


class EventLog(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def append(self, turn_id: str, frames: Sequence[Frame], *, restart: bool = False) -> None:
        """Append frames in order. Raises ``StaleWriter`` if a ``seq`` is not
        greater than the last one already logged, ``LogLost`` if the log is gone
        mid-sequence (see above), ``BackendUnavailable`` when the backend cannot
        be reached."""
        ...

    async def info(self, turn_id: str) -> LogInfo:
        """Raises ``NotFound`` when the turn has no log (never written, or expired)."""
        ...

    async def read(
        self, cursors: Mapping[str, int], *, block: float | None = None, count: int = 500
    ) -> dict[str, list[Frame]]:
        """Frames with ``seq > cursors[turn_id]`` for each turn, at most ``count``
        each. With ``block`` (seconds), waits up to that long for at least one
        frame when none is ready; returns ``{}`` on timeout. Turns without a log
        are absent from the result."""
        ...

    async def touch(self, turn_id: str, ttl: float) -> None:
        """Keep a live turn's log for at least ``ttl`` more seconds."""
        ...

    async def expire(self, turn_id: str, retention: float) -> None:
        """The turn ended: drop its log after ``retention`` seconds."""
        ...

    async def delete(self, turn_id: str) -> None: ...

    async def ping(self) -> None:
        """Raises ``BackendUnavailable`` when the backend cannot be reached."""
        ...
