"""SSE in the AI SDK UI Message Stream protocol (v1).

Every frame is ``id: <turn_id>:<seq>`` + ``data: <chunk json>``; the stream ends
with ``data: [DONE]`` (after the turn's ``finish``, or after the ``finish`` of a
pause for tool approvals when nothing follows it yet); heartbeats are SSE
comments. The response is a plain Starlette ``StreamingResponse``, which
cancels the generator when the client disconnects: the turn itself runs
elsewhere and is not affected.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from turnrelay.api.hub import StreamClosed, StreamHub
from turnrelay.errors import TurnrelayError
from turnrelay.events.base import Frame
from turnrelay.events.chunks import is_pause
from turnrelay.metrics import Metrics

HEADERS = {
    "x-vercel-ai-ui-message-stream": "v1",
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
    "connection": "keep-alive",
}
PING = b": ping\n\n"
# The most bytes of already-waiting frames joined into one write.
WRITE_BYTES = 64 * 1024
DONE = b"data: [DONE]\n\n"


def encode_frame(turn_id: str, frame: Frame) -> bytes:
    return f"id: {turn_id}:{frame.seq}\ndata: {frame.data}\n\n".encode()


def sse_response(
    body: AsyncIterator[bytes],
    extra_headers: dict[str, str] | None = None,
    *,
    background: BackgroundTask | None = None,
) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={**HEADERS, **(extra_headers or {})},
        background=background,
    )


async def done_only() -> AsyncIterator[bytes]:
    """The stream of a cursor that already saw the terminal frame: it just ends."""
    yield DONE


async def turn_frames(
    hub: StreamHub,
    turn_id: str,
    after: int,
    *,
    heartbeat: float,
    metrics: Metrics,
    preamble: bytes = b"",
    release: Callable[[], None] | None = None,
    waiting: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE bytes of one turn from ``after``: frames, pings while idle, [DONE].
    ``release`` runs when the stream ends, however it ends. At a pause for tool
    approvals with nothing after it yet, ``waiting`` says whether the turn still
    waits (the stream ends there) or was answered (it goes on)."""
    metrics.open_streams.inc()
    try:
        if preamble:
            yield preamble
        async with hub.subscribe(turn_id, after) as sub:
            while True:
                try:
                    frame = await sub.next(heartbeat)
                except (StreamClosed, TurnrelayError):
                    # No [DONE]: the client resumes with its cursor (here once the
                    # event log is back, after a slow reader was dropped, or on
                    # another replica); a cursor whose frames are gone then gets 410.
                    return
                if frame is None:
                    yield PING
                    continue
                # Frames already here go out in one write, up to WRITE_BYTES
                # (under load the hub hands several over at once): no frame
                # waits for another.
                out = [encode_frame(turn_id, frame)]
                size = len(out[0])
                while size < WRITE_BYTES and not (frame.terminal or is_pause(frame.data)):
                    more = sub.next_ready()
                    if more is None:
                        break
                    frame = more
                    out.append(encode_frame(turn_id, frame))
                    size += len(out[-1])
                yield out[0] if len(out) == 1 else b"".join(out)
                if frame.terminal:
                    break
                if (
                    not sub.pending
                    and is_pause(frame.data)
                    and (waiting is None or await waiting())
                ):
                    # The turn waits for approvals: this response ends here, as
                    # the AI SDK expects; the answer's request gets what follows.
                    # (The pause is persisted before its frame is written.)
                    break
        yield DONE
    finally:
        metrics.open_streams.dec()
        if release is not None:
            release()
