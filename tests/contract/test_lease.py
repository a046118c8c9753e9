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
        yield Harness(MemoryLease(clock), clock)
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = f"test-{unique}"
    lease = RedisLease(url, key_prefix=prefix)
    await lease.startup()
    try:
        yield Harness(lease, None)
    finally:
        await lease.shutdown()
        await delete_redis_prefix(url, prefix)


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
        ]
        for call in calls:
            with pytest.raises(BackendUnavailable) as caught:
                await asyncio.wait_for(call(), BOUND)
            assert "s3cret" not in str(caught.value)
    finally:
        await lease.shutdown()
