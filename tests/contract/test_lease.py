"""One Lease contract, run against the in-memory twin and Redis.

Time passes on a ManualClock for the memory lease and for real (short TTLs,
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
from turnrelay.errors import BackendUnavailable
from turnrelay.lease.base import Lease
from turnrelay.lease.memory import MemoryLease
from turnrelay.lease.redis import RedisLease

# Real seconds on Redis: wide enough margins that a loaded machine stays on
# the right side of each expiry, short enough to keep the suite quick.
TTL = 0.5
BEFORE = 0.3  # well inside a TTL
AFTER = TTL + 0.1  # past a TTL
BOUND = 3.0
LIVE = 60.0  # a liveness that outlasts any test


@dataclass
class Harness:
    lease: Lease
    clock: ManualClock | None  # None: real time (Redis)

    async def elapse(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    async def until_free(self, key: str) -> None:
        """Wait (bounded) until an expired lease is observed gone."""
        deadline = time.monotonic() + BOUND
        while await self.lease.holder(key) is not None:
            assert time.monotonic() < deadline, "lease did not expire in time"
            await asyncio.sleep(0.02)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = ManualClock()
        memory = MemoryLease(clock)
        await _alive(memory)
        yield Harness(memory, clock)
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = f"test-{unique}"
    lease = RedisLease(url, key_prefix=prefix)
    await lease.startup()
    await _alive(lease)
    try:
        yield Harness(lease, None)
    finally:
        await lease.shutdown()
        await delete_redis_prefix(url, prefix)


async def _alive(lease: Lease) -> None:
    """The owners of these tests are live executors (an owner that never beat is dead)."""
    for owner in ("a", "b"):
        await lease.beat(owner, LIVE, [])


async def test_acquire_and_holder(harness: Harness) -> None:
    lease = harness.lease
    assert await lease.holder("s1") is None
    assert await lease.acquire("s1", "a", TTL)
    assert await lease.holder("s1") == "a"
    assert not await lease.acquire("s1", "b", TTL)
    assert not await lease.acquire("s1", "a", TTL)  # not reentrant
    assert await lease.holder("s1") == "a"
    assert await lease.acquire("s2", "b", TTL)  # keys are independent


async def test_release_is_owner_checked(harness: Harness) -> None:
    lease = harness.lease
    assert await lease.acquire("s1", "a", TTL)
    assert not await lease.release("s1", "b")
    assert await lease.holder("s1") == "a"
    assert await lease.release("s1", "a")
    assert await lease.holder("s1") is None
    assert not await lease.release("s1", "a")  # nothing left to release
    assert await lease.acquire("s1", "b", TTL)


async def test_refresh_by_owner_extends(harness: Harness) -> None:
    lease = harness.lease
    assert await lease.acquire("s1", "a", TTL)
    await harness.elapse(BEFORE)
    assert await lease.refresh("s1", "a", TTL)
    await harness.elapse(BEFORE)  # past the first TTL, inside the refreshed one
    assert await lease.holder("s1") == "a"
    assert not await lease.refresh("s1", "b", TTL)
    assert await lease.holder("s1") == "a"


async def test_expired_lease_can_be_taken_and_the_old_owner_is_refused(harness: Harness) -> None:
    lease = harness.lease
    assert await lease.acquire("s1", "a", TTL)
    await harness.elapse(AFTER)
    await harness.until_free("s1")
    assert await lease.acquire("s1", "b", TTL)
    assert not await lease.refresh("s1", "a", TTL)
    assert not await lease.release("s1", "a")
    assert await lease.holder("s1") == "b"


async def test_refresh_of_an_expired_unclaimed_lease_fails(harness: Harness) -> None:
    # The old holder cannot know that nobody held the lease in between, so it
    # must stop; a refresh must not resurrect the lease either.
    lease = harness.lease
    assert await lease.acquire("s1", "a", TTL)
    await harness.elapse(AFTER)
    await harness.until_free("s1")
    assert not await lease.refresh("s1", "a", TTL)
    assert await lease.holder("s1") is None


async def test_a_lapsed_holders_lease_is_taken_over_within_its_ttl(harness: Harness) -> None:
    """A frozen or dead executor's sessions move on once its liveness lapses,
    long before the lease TTL."""
    lease = harness.lease
    await lease.beat("frozen", TTL, ["turn-1"])
    assert await lease.acquire("s1", "frozen", 60)
    assert not await lease.acquire("s1", "b", 60)  # alive: refused
    assert await lease.holder("s1") == "frozen"
    await harness.elapse(AFTER)  # no beat for a liveness TTL
    assert await lease.holder("s1") is None  # a dead holder holds nothing
    assert await lease.acquire("s1", "b", 60)
    assert await lease.holder("s1") == "b"
    # the frozen owner wakes up: its refresh fails, it cannot release b's lease
    await lease.beat("frozen", LIVE, [])
    assert not await lease.refresh("s1", "frozen", 60)
    assert not await lease.release("s1", "frozen")
    assert not await lease.acquire("s1", "frozen", 60)  # b is alive
    assert await lease.holder("s1") == "b"


async def test_an_owner_that_never_beat_is_dead(harness: Harness) -> None:
    lease = harness.lease
    assert await lease.acquire("s1", "ghost", 60)
    assert await lease.holder("s1") is None
    assert await lease.acquire("s1", "a", 60)


async def test_reap_hands_a_lapsed_owners_holdings_to_one_caller(harness: Harness) -> None:
    lease = harness.lease
    await lease.beat("x", TTL, ["t1 s1", "t2 s2"])
    await lease.beat("y", TTL, ["t3 s3"])
    assert await lease.reap() == []  # both alive
    await harness.elapse(AFTER)
    await lease.beat("y", LIVE, ["t3 s3"])  # y is still alive, x froze
    first, second = await asyncio.gather(lease.reap(), lease.reap())
    assert sorted(first + second) == ["t1 s1", "t2 s2"]
    assert await lease.reap() == []  # once only
    await lease.beat("x", TTL, ["t4 s4"])  # x wakes up: registered again
    await harness.elapse(AFTER)
    assert await lease.reap() == ["t4 s4"]


async def test_live_holdings_are_what_live_owners_hold(harness: Harness) -> None:
    """Whatever the session leases say: a lease can lapse under a live owner
    (a slow start), and what that owner holds is still its own."""
    lease = harness.lease
    await lease.beat("x", TTL, ["t1 s1"])
    await lease.beat("y", LIVE, ["t2 s2", "t3 s3"])
    assert await lease.live_holdings() == {"t1 s1", "t2 s2", "t3 s3"}
    await harness.elapse(AFTER)  # x stops beating
    assert await lease.live_holdings() == {"t2 s2", "t3 s3"}
    await lease.leave("y")
    assert await lease.live_holdings() == set()


async def test_leave_forgets_an_owner(harness: Harness) -> None:
    lease = harness.lease
    await lease.beat("x", TTL, ["t1 s1"])
    await lease.leave("x")
    await harness.elapse(AFTER)
    assert await lease.reap() == []  # a clean stop leaves nothing to reap


@pytest.mark.redis
async def test_redis_lease_key_layout(redis_url: str, unique: str) -> None:
    prefix = f"test-{unique}"
    lease = RedisLease(redis_url, key_prefix=prefix)
    await lease.startup()
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    key = f"{prefix}:lease:{{s1}}"
    try:
        assert await lease.acquire("s1", "a", 30)
        assert await raw.get(key) == "a"
        assert 0 < await raw.pttl(key) <= 30_000
    finally:
        await lease.shutdown()
        await raw.delete(key)
        await raw.aclose()


async def test_redis_unreachable_is_backend_unavailable() -> None:
    lease = RedisLease("redis://:s3cret@127.0.0.1:1/0")
    await lease.startup()
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: lease.acquire("s1", "a", 1),
            lambda: lease.refresh("s1", "a", 1),
            lambda: lease.release("s1", "a"),
            lambda: lease.holder("s1"),
            lambda: lease.beat("a", 1, []),
            lambda: lease.reap(),
            lambda: lease.leave("a"),
        ]
        for call in calls:
            with pytest.raises(BackendUnavailable) as caught:
                await asyncio.wait_for(call(), BOUND)
            assert "s3cret" not in str(caught.value)
    finally:
        await lease.shutdown()
