"""One EventLog contract, run against the in-memory twin and Redis Streams.

Time passes on a ManualClock for the memory log and for real (short TTLs,
bounded waits) on Redis; ``Harness.elapse`` hides the difference.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from tests.conftest import delete_redis_prefix
from turnrelay.clock import ManualClock
from turnrelay.errors import BackendUnavailable, LogLost, NotFound, StaleWriter
from turnrelay.events.base import EventLog, Frame, LogInfo
from turnrelay.events.memory import MemoryEventLog
from turnrelay.events.redis import RedisEventLog

SHORT_TTL = 0.2  # seconds: real on Redis, simulated on the memory log
BOUND = 3.0  # upper bound on any wait that should end much sooner
LIVE = 60.0  # the ttl an append gives a live log


@dataclass
class Harness:
    log: EventLog
    clock: ManualClock | None  # None: real time (Redis)

    async def elapse(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)


async def eventually(check: Callable[[], Awaitable[bool]], bound: float = BOUND) -> None:
    deadline = time.monotonic() + bound
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def gone(log: EventLog, turn_id: str) -> bool:
    try:
        await log.info(turn_id)
    except NotFound:
        return True
    return False


def frames(*seqs: int, terminal_at: int | None = None) -> list[Frame]:
    return [Frame(seq=s, data=f'{{"n":{s}}}', terminal=s == terminal_at) for s in seqs]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = ManualClock()
        yield Harness(MemoryEventLog(clock), clock)
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = f"test-{unique}"
    log = RedisEventLog(url, key_prefix=prefix)
    await log.startup()
    try:
        yield Harness(log, None)
    finally:
        await log.shutdown()
        await delete_redis_prefix(url, prefix)


async def test_append_then_read_in_order(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(1, 2), epoch=1, ttl=LIVE)
    await log.append("t1", frames(3, 4, terminal_at=4), epoch=1, ttl=LIVE)
    got = await log.read({"t1": 0})
    assert got == {"t1": frames(1, 2, 3, 4, terminal_at=4)}
    assert got["t1"][-1].terminal and not got["t1"][0].terminal


async def test_read_from_a_cursor_midway_and_with_count(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(*range(1, 8)), epoch=1, ttl=LIVE)
    assert await log.read({"t1": 4}) == {"t1": frames(5, 6, 7)}
    assert await log.read({"t1": 2}, count=2) == {"t1": frames(3, 4)}
    assert await log.read({"t1": 7}) == {}  # caught up: absent, like XREAD


async def test_read_several_turns_at_once(harness: Harness) -> None:
    log = harness.log
    await log.append("a", frames(1, 2, 3), epoch=1, ttl=LIVE)
    await log.append("b", frames(1, 2), epoch=1, ttl=LIVE)
    got = await log.read({"a": 1, "b": 0, "never-written": 0})
    assert got == {"a": frames(2, 3), "b": frames(1, 2)}


async def test_blocking_read_wakes_on_append_from_another_task(harness: Harness) -> None:
    log = harness.log
    await log.append("quiet", frames(1), epoch=1, ttl=LIVE)
    reader = asyncio.create_task(log.read({"quiet": 1, "t1": 0}, block=BOUND * 2))
    await asyncio.sleep(0.05)  # let the reader block; the assertion below proves it did
    assert not reader.done()
    started = time.monotonic()
    await log.append("t1", frames(1, 2), epoch=1, ttl=LIVE)
    got = await asyncio.wait_for(reader, BOUND)
    assert got == {"t1": frames(1, 2)}
    assert time.monotonic() - started < BOUND


async def test_blocking_read_returns_ready_frames_at_once(harness: Harness) -> None:
    await harness.log.append("t1", frames(1), epoch=1, ttl=LIVE)
    got = await asyncio.wait_for(harness.log.read({"t1": 0}, block=BOUND * 2), BOUND)
    assert got == {"t1": frames(1)}


async def test_block_timeout_returns_empty(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(1), epoch=1, ttl=LIVE)
    started = time.monotonic()
    assert await log.read({"t1": 1, "absent": 0}, block=0.1) == {}
    assert await log.read({}, block=0.1) == {}
    assert 0.15 <= time.monotonic() - started < BOUND


async def test_cancelled_blocking_read_leaves_the_log_usable(harness: Harness) -> None:
    log = harness.log
    for _ in range(3):
        reader = asyncio.create_task(log.read({"t1": 0}, block=BOUND * 2))
        await asyncio.sleep(0.05)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
    await log.append("t1", frames(1), epoch=1, ttl=LIVE)
    assert await log.read({"t1": 0}, block=1.0) == {"t1": frames(1)}
    reader = asyncio.create_task(log.read({"t1": 1}, block=BOUND * 2))
    await asyncio.sleep(0.05)
    await log.append("t1", frames(2), epoch=1, ttl=LIVE)
    assert await asyncio.wait_for(reader, BOUND) == {"t1": frames(2)}


async def test_wake_ends_a_blocked_read_without_cancelling_it(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(1), epoch=1, ttl=LIVE)
    reader = asyncio.create_task(log.read({"t1": 1}, block=BOUND * 2, wake="hub-a"))
    await asyncio.sleep(0.05)
    await log.wake("hub-b")  # another channel: not this reader's
    await asyncio.sleep(0.1)
    assert not reader.done()
    await log.wake("hub-a")
    assert await asyncio.wait_for(reader, BOUND) == {}
    # The read after it blocks again (the wake was taken) and still sees appends.
    reader = asyncio.create_task(log.read({"t1": 1}, block=BOUND * 2, wake="hub-a"))
    await asyncio.sleep(0.1)
    assert not reader.done()
    await log.append("t1", frames(2), epoch=1, ttl=LIVE)
    assert await asyncio.wait_for(reader, BOUND) == {"t1": frames(2)}


async def test_a_wake_before_the_read_is_latched(harness: Harness) -> None:
    log = harness.log
    await log.wake("hub-a")
    started = time.monotonic()
    assert await log.read({"t1": 0}, block=BOUND * 2, wake="hub-a") == {}
    assert time.monotonic() - started < BOUND
    # Taken once: the next read blocks until its timeout.
    started = time.monotonic()
    assert await log.read({"t1": 0}, block=0.3, wake="hub-a") == {}
    assert time.monotonic() - started >= 0.25


async def test_a_woken_read_still_returns_ready_frames(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(1, 2), epoch=1, ttl=LIVE)
    await log.wake("hub-a")
    got = await asyncio.wait_for(log.read({"t1": 0}, block=BOUND, wake="hub-a"), BOUND)
    assert got == {"t1": frames(1, 2)}


def other(*seqs: int) -> list[Frame]:
    """Frames at ``seqs`` whose content differs from ``frames(*seqs)``."""
    return [Frame(seq=s, data=f'{{"other":{s}}}') for s in seqs]


@pytest.mark.parametrize("stale", [[3], [2], [1, 4], [0], [4, 4], [5, 4]])
async def test_stale_or_disordered_batch_is_refused_whole(
    harness: Harness, stale: list[int]
) -> None:
    log = harness.log
    await log.append("t1", frames(1, 2, 3), epoch=1, ttl=LIVE)
    with pytest.raises(StaleWriter):
        await log.append("t1", other(*stale), epoch=1, ttl=LIVE)
    assert await log.read({"t1": 0}) == {"t1": frames(1, 2, 3)}
    assert await log.info("t1") == LogInfo(first_seq=1, last_seq=3, terminal=False)
    await log.append("t1", frames(4), epoch=1, ttl=LIVE)  # the rightful writer continues
    assert (await log.info("t1")).last_seq == 4


async def test_a_resent_batch_that_landed_is_a_no_op(harness: Harness) -> None:
    """The answer to a lost reply: the writer sends the same batch again."""
    log = harness.log
    await log.append("t1", frames(1, 2), epoch=1, ttl=LIVE)
    await log.append("t1", frames(3, 4), epoch=1, ttl=LIVE)
    await log.append("t1", frames(3, 4), epoch=1, ttl=LIVE)  # landed before: no-op
    await log.append("t1", frames(1, 2), epoch=1, ttl=LIVE)
    assert await log.read({"t1": 0}) == {"t1": frames(1, 2, 3, 4)}
    with pytest.raises(StaleWriter):  # overlapping the top: not a re-send
        await log.append("t1", frames(4, 5), epoch=1, ttl=LIVE)
    await log.append("t1", frames(5), epoch=1, ttl=LIVE)


async def test_a_claim_fences_out_the_older_epoch_whoever_writes_first(
    harness: Harness,
) -> None:
    log = harness.log
    await log.append("t1", frames(1, 2), epoch=1, ttl=LIVE)  # attempt 1
    info = await log.claim("t1", 2, LIVE)  # attempt 2 takes over
    assert info == LogInfo(first_seq=1, last_seq=2, terminal=False)
    with pytest.raises(StaleWriter):  # attempt 1 wakes up and writes first
        await log.append("t1", frames(3), epoch=1, ttl=LIVE)
    with pytest.raises(StaleWriter):
        await log.claim("t1", 1, LIVE)
    await log.append("t1", other(3, 4), epoch=2, ttl=LIVE)  # the new owner is not stuck
    assert (await log.read({"t1": 2}))["t1"] == other(3, 4)
    # the new epoch's batch sent again is a no-op; the old epoch's same seqs are not
    await log.append("t1", other(3, 4), epoch=2, ttl=LIVE)
    with pytest.raises(StaleWriter):
        await log.append("t1", frames(5), epoch=1, ttl=LIVE)


async def test_a_batch_of_the_old_epoch_below_the_claim_is_not_a_resend(
    harness: Harness,
) -> None:
    log = harness.log
    await log.append("t1", frames(1, 2), epoch=1, ttl=LIVE)
    await log.claim("t1", 2, LIVE)
    with pytest.raises(StaleWriter):  # identical bytes, but written before the claim
        await log.append("t1", frames(2), epoch=2, ttl=LIVE)


async def test_a_claim_holds_on_a_missing_log(harness: Harness) -> None:
    """After a loss the new owner claims an absent log: the old owner's restart
    of that log is refused, the new owner's goes through."""
    log = harness.log
    info = await log.claim("t1", 3, LIVE)
    assert not info.exists and info.last_seq == 0
    with pytest.raises(StaleWriter):
        await log.append("t1", frames(7), epoch=2, ttl=LIVE, restart=True)
    await log.append("t1", frames(7), epoch=3, ttl=LIVE, restart=True)
    assert await log.claim("t1", 3, LIVE) == LogInfo(first_seq=7, last_seq=7, terminal=False)


async def test_an_append_of_a_higher_epoch_claims_the_log_itself(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(1), epoch=1, ttl=LIVE)
    await log.append("t1", frames(2), epoch=5, ttl=LIVE)
    with pytest.raises(StaleWriter):
        await log.append("t1", frames(3), epoch=4, ttl=LIVE)
    assert (await log.claim("t1", 5, LIVE)).last_seq == 2


async def test_an_append_gives_the_log_its_ttl(harness: Harness) -> None:
    """No log is ever left without an expiry, whoever dies after writing it."""
    log = harness.log
    await log.append("t1", frames(1), epoch=1, ttl=SHORT_TTL)
    await harness.elapse(SHORT_TTL + 0.05)
    await eventually(lambda: gone(log, "t1"))
    # the epoch went with it: a new first attempt may start the log again
    await log.append("t1", frames(1), epoch=1, ttl=LIVE)


async def test_append_mid_sequence_to_a_missing_log_is_log_lost(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(1, 2, 3), epoch=1, ttl=LIVE)
    await log.delete("t1")  # as after a Redis restart without persistence
    with pytest.raises(LogLost):
        await log.append("t1", frames(4), epoch=1, ttl=LIVE)
    with pytest.raises(NotFound):
        await log.info("t1")  # nothing was written
    await log.append(
        "t1", frames(4, 5), epoch=1, ttl=LIVE, restart=True
    )  # the writer knows: restart here
    assert await log.info("t1") == LogInfo(first_seq=4, last_seq=5, terminal=False)
    await log.append("t2", frames(1), epoch=1, ttl=LIVE)  # a new log starts at 1 without ceremony
    await log.append("t2", frames(2), epoch=1, ttl=LIVE)


async def test_empty_batch_is_a_no_op(harness: Harness) -> None:
    await harness.log.append("t1", [], epoch=1, ttl=LIVE)
    with pytest.raises(NotFound):
        await harness.log.info("t1")


async def test_info_absent_present_terminal(harness: Harness) -> None:
    log = harness.log
    with pytest.raises(NotFound):
        await log.info("t1")
    await log.append("t1", frames(1, 2), epoch=1, ttl=LIVE)
    assert await log.info("t1") == LogInfo(first_seq=1, last_seq=2, terminal=False)
    await log.append(
        "t1", frames(5, 6, terminal_at=6), epoch=1, ttl=LIVE
    )  # a retried attempt may skip ahead
    assert await log.info("t1") == LogInfo(first_seq=1, last_seq=6, terminal=True)


async def test_expire_drops_the_log_after_retention(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(1, terminal_at=1), epoch=1, ttl=LIVE)
    await log.append("t2", frames(1), epoch=1, ttl=LIVE)
    await log.expire("t1", SHORT_TTL)
    assert (await log.info("t1")).terminal  # still there until retention passes
    await harness.elapse(SHORT_TTL + 0.05)
    await eventually(lambda: gone(log, "t1"))
    assert await log.read({"t1": 0, "t2": 0}) == {"t2": frames(1)}


async def test_touch_keeps_a_live_log(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(1), epoch=1, ttl=LIVE)
    await log.touch("t1", SHORT_TTL)
    await log.touch("t1", 60)  # the heartbeat pushes expiry forward
    await harness.elapse(SHORT_TTL + 0.1)
    assert (await log.info("t1")).last_seq == 1
    assert await log.touch("t1", 60) is True
    assert await log.touch("absent", 60) is False  # no log: nothing to keep, and no error
    await log.expire("absent", 60)
    with pytest.raises(NotFound):
        await log.info("absent")


async def test_delete(harness: Harness) -> None:
    log = harness.log
    await log.append("t1", frames(1, 2), epoch=1, ttl=LIVE)
    await log.delete("t1")
    with pytest.raises(NotFound):
        await log.info("t1")
    assert await log.read({"t1": 0}) == {}
    await log.delete("t1")  # idempotent
    await log.append("t1", frames(1), epoch=1, ttl=LIVE)  # a deleted log starts afresh
    assert await log.read({"t1": 0}) == {"t1": frames(1)}


async def test_ping(harness: Harness) -> None:
    await harness.log.ping()


async def test_memory_log_frees_expired_logs() -> None:
    """A long-running ``serve`` stays flat: expired logs are freed, not just hidden."""
    clock = ManualClock()
    log = MemoryEventLog(clock)
    for t in range(200):
        await log.append(f"turn{t}", frames(*range(1, 21), terminal_at=20), epoch=1, ttl=LIVE)
        await log.claim(f"turn{t}", 2, LIVE)
        await log.expire(f"turn{t}", 3600)
    await log.append("kept", frames(1), epoch=1, ttl=10 * 3600)
    assert log.size == (201, 4001)
    clock.advance(2 * 3600)  # every log but one is past its retention
    await log.append("new", frames(1), epoch=1, ttl=LIVE)
    assert log.size == (2, 2)
    assert log.epochs == 2


# Redis only: the wire layout other tools rely on, and error translation.


@pytest.mark.redis
async def test_redis_stream_layout(redis_url: str, unique: str) -> None:
    prefix = f"test-{unique}"
    log = RedisEventLog(redis_url, key_prefix=prefix)
    await log.startup()
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await log.append("t1", frames(1, 2, terminal_at=2), epoch=1, ttl=LIVE)
        key = f"{prefix}:turn:{{t1}}:log"
        assert log.key("t1") == key
        entries = await raw.xrange(key)
        assert entries == [("0-1", {"d": '{"n":1}'}), ("0-2", {"d": '{"n":2}', "t": "1"})]
        assert 0 < await raw.pttl(key) <= LIVE * 1000  # an append sets the expiry
        assert await raw.hgetall(log.epoch_key("t1")) == {"e": "1", "b": "0"}
        await log.expire("t1", 30)
        assert 0 < await raw.pttl(key) <= 30_000
        assert 0 < await raw.pttl(log.epoch_key("t1")) <= LIVE * 1000
    finally:
        await log.shutdown()
        await raw.aclose()
        await delete_redis_prefix(redis_url, prefix)


@pytest.mark.redis
async def test_redis_empty_stream_info(redis_url: str, unique: str) -> None:
    prefix = f"test-{unique}"
    log = RedisEventLog(redis_url, key_prefix=prefix)
    await log.startup()
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await log.append("t1", frames(1), epoch=1, ttl=LIVE)
        await raw.xdel(log.key("t1"), "0-1")
        assert await log.info("t1") == LogInfo(first_seq=0, last_seq=0, terminal=False)
        with pytest.raises(StaleWriter):  # the fence remembers the top id
            await log.append("t1", frames(1), epoch=1, ttl=LIVE)
    finally:
        await log.shutdown()
        await raw.aclose()
        await delete_redis_prefix(redis_url, prefix)


async def test_redis_unreachable_is_backend_unavailable() -> None:
    log = RedisEventLog("redis://:s3cret@127.0.0.1:1/0")
    await log.startup()
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            log.ping,
            lambda: log.append("t1", frames(1), epoch=1, ttl=LIVE),
            lambda: log.info("t1"),
            lambda: log.read({"t1": 0}),
            lambda: log.read({"t1": 0}, block=0.1),
            lambda: log.touch("t1", 1),
            lambda: log.claim("t1", 1, 1),
            lambda: log.delete("t1"),
        ]
        for call in calls:
            with pytest.raises(BackendUnavailable) as caught:
                await asyncio.wait_for(call(), BOUND)
            assert "s3cret" not in str(caught.value)
            assert "127.0.0.1:1" in str(caught.value)
    finally:
        await log.shutdown()
