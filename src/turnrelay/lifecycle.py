"""Lifecycle rules shared by the API, the executor and the sweeper.

The turn's terminal state is set once, by the store's compare-and-set; the
winner writes the terminal frames. ``close_stream`` writes them for a winner
that is not a running executor (the API cancelling a queued turn, the sweeper,
an executor repairing a turn whose previous owner died between the CAS and
the frames). It is idempotent: explicit frame sequence numbers make a second
writer's append fail with ``StaleWriter``, which here means "already done".
"""

from __future__ import annotations

from turnrelay.errors import NotFound, StaleWriter
from turnrelay.events import chunks
from turnrelay.events.base import EventLog, Frame
from turnrelay.events.chunks import Chunk
from turnrelay.store.base import TurnRecord, TurnStatus


def session_lease_key(session_id: str) -> str:
    return f"session:{session_id}"


def terminal_chunks(
    status: TurnStatus, error: str | None, usage: dict[str, int] | None = None
) -> list[Chunk]:
    """How a turn's stream ends: ``finish``; ``error, finish``; or ``abort, finish``."""
    tail: list[Chunk] = []
    if status is TurnStatus.FAILED:
        tail.append(chunks.error(error or "the turn failed"))
    elif status is TurnStatus.CANCELLED:
        tail.append(chunks.abort())
    metadata: dict[str, object] = {"status": status.value}
    if usage:
        metadata["usage"] = usage
    tail.append(chunks.finish(metadata))
    return tail


async def close_stream(log: EventLog, turn: TurnRecord, retention: float) -> None:
    """Make the log of a terminal ``turn`` end with its terminal frames."""
    try:
        info = await log.info(turn.id)
        last, done = info.last_seq, info.terminal
    except NotFound:
        last, done = 0, False
    if done:
        return
    body: list[Chunk] = [chunks.start(turn.assistant_message_id)] if last == 0 else []
    body += terminal_chunks(turn.status, turn.error, turn.usage)
    frames = [
        Frame(last + i, chunks.encode(c), c["type"] == chunks.FINISH)
        for i, c in enumerate(body, start=1)
    ]
    try:
        await log.append(turn.id, frames)
    except StaleWriter:
        return  # another writer closed it concurrently
    await log.expire(turn.id, retention)
