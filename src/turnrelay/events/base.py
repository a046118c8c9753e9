"""The EventLog port.

A turn's log is a sequence of frames numbered ``1, 2, 3 …`` (``seq``). A retried
attempt continues the sequence.

Fencing is by **epoch**, not by who writes first. Every writer has an epoch:
the turn's attempt number for the executor running it (unique, because the
store's compare-and-set hands out each attempt once), ``CLOSER_EPOCH`` for
whoever closes the stream of a turn that already ended. A writer ``claim``s the
log before it reads where the log ends; from then on an append with a lower
epoch raises ``StaleWriter``, whatever its ``seq``. So a frozen executor that
wakes up after another took its turn writes nothing, even if it writes before
the new owner's first frame. Within one epoch appends are idempotent: a batch
that is re-sent after a lost reply, and that the log already holds byte for
byte, is a no-op rather than an error; a different batch at seqs the log
already holds is refused (``StaleWriter``). The ``seq`` order is fenced too: a
batch's seqs must increase and start above the log's last one.

Continuity is fenced: appending a frame with ``seq > 1`` to a log that does not
exist raises ``LogLost`` (Redis restarted without its data, or the log
expired), unless ``restart=True`` says the writer knows and is restarting the
log mid-sequence (with a ``data-stream-reset`` frame first).

The frame whose chunk type is ``finish`` ends the turn's stream; readers stop
after it. Every append gives the log (and its epoch) ``ttl`` more seconds, so a
log can never be left without an expiry, whoever dies when; the executor's
heartbeat ``touch``es it meanwhile so a long silent tool call never expires a
live turn, and learns from ``touch`` when the log has vanished.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from turnrelay.errors import StaleWriter


@dataclass(frozen=True, slots=True)
class Frame:
    """One log entry: a UI message stream chunk, already JSON-encoded."""

    seq: int
    data: str
    terminal: bool = False  # True for the ``finish`` chunk, the stream's last frame


# The epoch of a writer that closes the stream of a turn that already ended (the
# API cancelling a queued turn, a repair after the owner died between the CAS
# and the frames): above every attempt, so no executor writes after it.
CLOSER_EPOCH = 2**62


@dataclass(frozen=True, slots=True)
class LogInfo:
    first_seq: int  # 0 when the log exists but holds no frame
    last_seq: int
    terminal: bool  # the last frame is the ``finish`` frame
    exists: bool = True  # False only from ``claim``: there is no log (yet, or any more)


class EventLog(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def claim(self, turn_id: str, epoch: int, ttl: float) -> LogInfo:
        """Fence out every lower epoch, then say where the log ends (``exists``
        is False when there is none; the fence holds anyway, for ``ttl``).
        Raises ``StaleWriter`` when a higher epoch already claimed the log.
        Claiming again with the same epoch is harmless."""
        ...

    async def append(
        self,
        turn_id: str,
        frames: Sequence[Frame],
        *,
        epoch: int,
        ttl: float,
        restart: bool = False,
    ) -> None:
        """Append frames in order and keep the log ``ttl`` more seconds. Raises
        ``StaleWriter`` for a lower epoch than the log's, or seqs the log already
        holds other frames at; ``LogLost`` if the log is gone mid-sequence (see
        above); ``BackendUnavailable`` when the backend cannot be reached (the
        batch may or may not have landed: sending it again is safe)."""
        ...

    async def info(self, turn_id: str) -> LogInfo:
        """Raises ``NotFound`` when the turn has no log (never written, or expired)."""
        ...

    async def read(
        self,
        cursors: Mapping[str, int],
        *,
        block: float | None = None,
        count: int = 500,
        wake: str | None = None,
    ) -> dict[str, list[Frame]]:
        """Frames with ``seq > cursors[turn_id]`` for each turn, at most ``count``
        each. With ``block`` (seconds), waits up to that long for at least one
        frame when none is ready; returns ``{}`` on timeout. Turns without a log
        are absent from the result. A blocked read with a ``wake`` channel also
        returns (possibly ``{}``) once ``wake(channel)`` is called, or at once if
        it was called since that channel's last read: a reader can be told to
        re-read with new cursors without cancelling its read."""
        ...

    async def wake(self, channel: str) -> None:
        """End the blocked read on ``channel`` (latched until the next read)."""
        ...

    async def touch(self, turn_id: str, ttl: float) -> bool:
        """Keep a live turn's log for ``ttl`` more seconds; ``False`` when there is
        no log to keep (it vanished: Redis lost its data)."""
        ...

    async def expire(self, turn_id: str, retention: float) -> None:
        """The turn ended: drop its log after ``retention`` seconds."""
        ...

    async def delete(self, turn_id: str) -> None: ...

    async def ping(self) -> None:
        """Raises ``BackendUnavailable`` when the backend cannot be reached."""
        ...


def check_increasing(turn_id: str, frames: Sequence[Frame]) -> None:
    """Raise ``StaleWriter`` unless the batch's seqs increase (checked before
    anything is sent, so only its first frame can meet the log's fence)."""
    previous = 0
    for frame in frames:
        if frame.seq <= previous:
            raise StaleWriter(
                f"turn {turn_id}: frame seq {frame.seq} is not greater than {previous}"
            )
        previous = frame.seq
