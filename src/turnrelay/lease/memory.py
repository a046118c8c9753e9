"""The in-process Lease: the embedded mode's twin of ``RedisLease``.

Expiry runs on the injectable clock. As in Redis, an expired lease is simply
gone: ``refresh`` by its old owner answers ``False`` even when nobody took it
since, because the holder cannot know that nobody wrote in between. ``acquire``
is not reentrant: the owner itself is refused while its lease is live. A lease
whose holder's liveness lapsed is taken over, as in Redis.
"""

from __future__ import annotations

from collections.abc import Sequence

from turnrelay.clock import Clock, SystemClock

# How long an owner's holdings outlive its last beat, for a reaper to find them.
HOLDINGS_TTL = 600.0


class MemoryLease:
    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._leases: dict[str, tuple[str, float]] = {}  # key -> (owner, expires_at)
        self._alive: dict[str, float] = {}  # owner -> expires_at
        self._holdings: dict[str, tuple[list[str], float]] = {}  # owner -> (held, expires_at)

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

    def _is_alive(self, owner: str) -> bool:
        return self._alive.get(owner, float("-inf")) > self._clock.now()

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        current = self._owner(key)
        if current is not None and (current == owner or self._is_alive(current)):
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
        owner = self._owner(key)
        return owner if owner is not None and self._is_alive(owner) else None

    async def beat(self, owner: str, ttl: float, holding: Sequence[str]) -> None:
        now = self._clock.now()
        self._alive[owner] = now + ttl
        self._holdings[owner] = (list(holding), now + max(ttl, HOLDINGS_TTL))

    async def live_holdings(self) -> set[str]:
        held: set[str] = set()
        for owner, (items, _) in self._holdings.items():
            if self._is_alive(owner):
                held.update(items)
        return held

    async def reap(self) -> list[str]:
        now = self._clock.now()
        reaped: list[str] = []
        for owner in [o for o in self._alive if not self._is_alive(o)]:
            del self._alive[owner]
            held, expires_at = self._holdings.pop(owner, ([], now))
            if expires_at > now:
                reaped += held
        return reaped

    async def leave(self, owner: str) -> None:
        self._alive.pop(owner, None)
        self._holdings.pop(owner, None)
