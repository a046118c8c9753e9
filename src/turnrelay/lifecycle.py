"""Lifecycle rules shared by the API, the executor and the sweeper.

The turn's terminal state is set once, by the store's compare-and-set; the
winner writes the terminal frames. ``close_stream`` writes them for a winner
that is not a running executor (the API cancelling a queued turn, the sweeper,
an executor repairing a turn whose previous owner died between the CAS and
the frames). It writes with ``CLOSER_EPOCH``, above every attempt, so once it
has claimed the log no executor can append to it any more; two closers write
the same frames (both derive them from the stored outcome), so the second's
append is a no-op or meets the first's terminal frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from turnrelay.errors import StaleWriter
from turnrelay.events import chunks
from turnrelay.events.base import CLOSER_EPOCH, EventLog, Frame
from turnrelay.events.chunks import Chunk
from turnrelay.store.base import ExecutorStore, TurnRecord, TurnStatus

# A log restarted after it was lost starts its frames at a multiple of this
# (attempt n's retry at (n - 1) * SEQ_EPOCH + 1), so no cursor of the lost
# frames can resume into frames of another attempt.
SEQ_EPOCH = 1_000_000


def session_lease_key(session_id: str) -> str:
    return f"session:{session_id}"


def terminal_chunks(
    status: TurnStatus, error: str | None, usage: dict[str, int] | None = None
) -> list[Chunk]:
    """How a turn's stream ends: ``finish``; ``error, finish``; or ``abort, finish``."""
    tail: list[Chunk] = []
    reason = "stop"
    if status is TurnStatus.FAILED:
        tail.append(chunks.error(error or "the turn failed"))
        reason = "error"
    elif status is TurnStatus.CANCELLED:
        tail.append(chunks.abort(error or "cancelled"))
        reason = "other"
    metadata: dict[str, object] = {"status": status.value}
    if usage:
        metadata["usage"] = usage
    tail.append(chunks.finish(metadata, reason=reason))
    return tail


async def close_stream(log: EventLog, turn: TurnRecord, retention: float) -> None:
    """Make the log of a terminal ``turn`` end with its terminal frames."""
    info = await log.claim(turn.id, CLOSER_EPOCH, retention)
    if info.terminal:
        return
    body: list[Chunk] = []
    last, restart = info.last_seq, False
    if not info.exists and turn.attempt > 0:
        # The log of a turn that ran is gone (Redis lost it): jump past any
        # cursor a reader may hold, as a retry does.
        last, restart = turn.attempt * SEQ_EPOCH, True
        body.append(chunks.data("stream-reset", {"seq": last + 1}, transient=True))
    if last == 0 or restart:
        body.append(chunks.start(turn.assistant_message_id))
    body += terminal_chunks(turn.status, turn.error, turn.usage)
    frames = [
        Frame(last + i, chunks.encode(c), c["type"] == chunks.FINISH)
        for i, c in enumerate(body, start=1)
    ]
    try:
        await log.append(turn.id, frames, epoch=CLOSER_EPOCH, ttl=retention, restart=restart)
    except StaleWriter:
        return  # another closer finished it concurrently


async def admit_heads(
    store: ExecutorStore,
    session_id: str,
    publish: Callable[[TurnRecord], Awaitable[None]],
    *,
    max_running_per_user: int,
    republish_before: datetime | None = None,
) -> int:
    """Admit and publish heads from the session owner's FIFO until none is left
    or their running slots are full; how many were published.

    One admission per freed slot is not enough: heads can wait while slots are
    free (a session's next turn is a waiting head from its previous turn's
    finish until the dispatch after it; an executor can die in between), and
    each of those needs an admission of its own. The loop stops at the first
    call that admits nothing, so the common case costs one call."""
    published = 0
    for _ in range(max_running_per_user + 1):  # +1: a republished in-flight head
        head = await store.dispatch_next(
            session_id,
            republish_before=republish_before,
            max_running_per_user=max_running_per_user,
        )
        if head is None:
            break
        await publish(head)
        published += 1
    return published
