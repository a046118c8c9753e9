"""The in-process Lease: the embedded mode's twin of ``RedisLease``.

Expiry runs on the injectable clock. As in Redis, an expired lease is simply
gone: ``refresh`` by its old owner answers ``False`` even when nobody took it
since, because the holder cannot know that nobody wrote in between. ``acquire``
is not reentrant: the owner itself is refused while its lease is live.
"""

from __future__ import annotations

from turnrelay.clock import Clock, SystemClock


class MemoryLease:
    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._leases: dict[str, tuple[str, float]] = {}  # key -> (owner, expires_at)

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def _owner(self, key: str) -> str | None:
        lease = self._leases.get(key)
        if lease is None:
            return None
        owner, expires_at = lease
        if self._clock.now() >= expires_at:
            del self._leases[key]
            return None
        return owner

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        if self._owner(key) is not None:
            return False
        self._leases[key] = (owner, self._clock.now() + ttl)
        return True

    async def refresh(self, key: str, owner: str, ttl: float) -> bool:
        if self._owner(key) != owner:
            return False
        self._leases[key] = (owner, self._clock.now() + ttl)
        return True

    async def release(self, key: str, owner: str) -> bool:
        if self._owner(key) != owner:
            return False
        del self._leases[key]
        return True

    async def holder(self, key: str) -> str | None:
        return self._owner(key)
