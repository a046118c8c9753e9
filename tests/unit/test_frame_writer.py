"""FrameWriter: batching, coalescing, fencing, and restarting a lost log."""

from __future__ import annotations

import asyncio
import json

import pytest

from turnrelay.errors import BackendUnavailable, StaleWriter
from turnrelay.events import chunks
from turnrelay.events.base import Frame
from turnrelay.events.memory import MemoryEventLog
from turnrelay.executor.assembler import Assembler
from turnrelay.executor.frames import FrameWriter
from turnrelay.runtime.base import StepStart, TextDelta


def decoded(frames: list[Frame]) -> list[dict]:
    return [json.loads(f.data) for f in frames]


TTL = 60.0


def writer_for(log: MemoryEventLog, next_seq: int = 1, epoch: int = 1, **kw) -> FrameWriter:  # type: ignore[no-untyped-def]
    return FrameWriter(log, "t", next_seq, epoch=epoch, ttl=TTL, **kw)


async def read_all(log: MemoryEventLog, turn: str, after: int = 0) -> list[Frame]:
    return (await log.read({turn: after})).get(turn, [])


async def test_deltas_written_while_a_write_is_in_flight_are_coalesced() -> None:
    log = MemoryEventLog()
    writer = writer_for(log)
    writer.add(chunks.start("m"), chunks.text_start("a"))
    for word in ("one", " two", " three"):
        writer.add(chunks.text_delta("a", word))
    await writer.flush()
    frames = await read_all(log, "t")
    assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
    deltas = [c["delta"] for c in decoded(frames) if c["type"] == "text-delta"]
    assert "".join(deltas) == "one two three" and len(deltas) < 3
    await writer.close()


async def test_stale_writer_surfaces_on_flush() -> None:
    log = MemoryEventLog()
    await log.append("t", [Frame(1, "{}"), Frame(2, "{}")], epoch=1, ttl=TTL)
    writer = writer_for(log, 2)  # thinks the log ends at 1
    writer.add(chunks.start("m"))
    with pytest.raises(StaleWriter):
        await writer.flush()
    with pytest.raises(StaleWriter):
        writer.add(chunks.abort())


async def test_a_newer_attempt_fences_the_writer_out_whoever_writes_first() -> None:
    log = MemoryEventLog()
    old = writer_for(log, epoch=1)
    old.add(chunks.start("m"), chunks.text_start("a"))
    await old.flush()
    info = await log.claim("t", 2, TTL)  # attempt 2 takes the turn over
    old.add(chunks.text_delta("a", "written after the takeover"))  # the old owner wakes up
    with pytest.raises(StaleWriter):
        await old.flush()
    new = writer_for(log, info.last_seq + 1, epoch=2)
    new.add(chunks.data("turn-retry", {"attempt": 2}, transient=True))
    await new.flush()  # the new owner is not stuck behind the old one's frame
    kinds = [c["type"] for c in decoded(await read_all(log, "t"))]
    assert kinds == ["start", "text-start", "data-turn-retry"]
    await old.close()
    await new.close()


async def test_a_lost_log_restarts_with_a_reset_and_a_snapshot() -> None:
    log = MemoryEventLog()
    asm = Assembler()
    writer = writer_for(log, snapshot=lambda: [chunks.start("m"), *asm.snapshot()])
    writer.add(chunks.start("m"))
    for event in (StepStart(), TextDelta("hello"), TextDelta(" wor")):
        writer.add(*asm.feed(event))
    await writer.flush()
    before = await read_all(log, "t")
    caught_up = before[-1].seq
    await log.delete("t")  # Redis restarted empty
    writer.add(*asm.feed(TextDelta("ld")))
    await writer.flush()
    after = await read_all(log, "t")
    assert after[0].seq == caught_up + 1  # the sequence continues: old cursors get 410
    kinds = [c["type"] for c in decoded(after)]
    assert kinds[:3] == ["data-stream-reset", "start", "start-step"]
    text = "".join(c["delta"] for c in decoded(after) if c["type"] == "text-delta")
    assert text == "hello world"  # the snapshot holds what was lost and the new delta
    part_ids = {c["id"] for c in decoded(before) + decoded(after) if c["type"] == "text-start"}
    assert len(part_ids) == 1  # the open part keeps its id, so later deltas attach
    writer.add(*asm.feed(TextDelta("!")), *asm.close(), chunks.finish())
    await writer.flush()
    tail = decoded(await read_all(log, "t", after[-1].seq))
    assert [c["type"] for c in tail] == ["text-delta", "text-end", "finish-step", "finish"]
    await writer.close()


class FlakyLog(MemoryEventLog):
    """Fails the next ``failures`` appends; ``landed`` makes the first one land anyway."""

    def __init__(self, failures: int, landed: bool) -> None:
        super().__init__()
        self.failures = failures
        self.landed = landed

    async def append(self, turn_id: str, frames, **kw) -> None:  # type: ignore[no-untyped-def, override]
        if self.failures:
            self.failures -= 1
            if self.landed:
                self.landed = False
                await super().append(turn_id, frames, **kw)
            raise BackendUnavailable("connection reset")
        await super().append(turn_id, frames, **kw)

    async def info(self, turn_id: str):  # type: ignore[no-untyped-def, override]
        raise BackendUnavailable("still restarting")  # Redis answers nothing but appends


@pytest.mark.parametrize("landed", [False, True])
async def test_an_outage_is_retried_without_duplicating_a_landed_write(landed: bool) -> None:
    """A write whose reply was lost is sent again; the rightful writer is never
    called stale for its own landed batch, whatever else fails meanwhile."""
    log = FlakyLog(failures=2, landed=landed)
    writer = writer_for(log)
    writer.add(chunks.start("m"), chunks.text_start("a"), chunks.text_delta("a", "x"))
    await asyncio.wait_for(writer.flush(), 10)
    frames = await read_all(log, "t")
    assert [f.seq for f in frames] == [1, 2, 3]
    writer.add(chunks.text_end("a"))
    await writer.flush()
    assert [f.seq for f in await read_all(log, "t")] == [1, 2, 3, 4]
    await writer.close()


async def test_restore_rebuilds_a_log_lost_during_a_silent_stretch() -> None:
    """The heartbeat finds the log gone while nothing is being written (a long
    tool call): the writer restarts it at once, without waiting for a chunk."""
    log = MemoryEventLog()
    asm = Assembler()
    writer = writer_for(log, snapshot=lambda: [chunks.start("m"), *asm.snapshot()])
    writer.add(chunks.start("m"))
    for event in (StepStart(), TextDelta("so far")):
        writer.add(*asm.feed(event))
    await writer.flush()
    last = (await log.info("t")).last_seq
    await log.delete("t")
    writer.restore()
    await writer.flush()
    after = await read_all(log, "t")
    assert after[0].seq == last + 1
    kinds = [c["type"] for c in decoded(after)]
    assert kinds[:3] == ["data-stream-reset", "start", "start-step"]
    assert "".join(c["delta"] for c in decoded(after) if c["type"] == "text-delta") == "so far"
    writer.add(*asm.feed(TextDelta(".")))
    await writer.flush()
    assert (await log.info("t")).last_seq == after[-1].seq + 1
    await writer.close()
