"""The Lease port: one executor per session, and crash detection.

A lease is a key with an owner token and a time-to-live. ``refresh`` and
``release`` succeed only for the current owner (in Redis: ``SET NX PX`` plus
owner-checked Lua scripts). A refresh that answers ``False`` means the lease was
lost (it expired, or another owner took it): the holder must stop writing at
once. Booleans here are answers, not error sentinels: a backend failure raises
``BackendUnavailable``.

Liveness. Each owner (an executor) also ``beat``s: a short-lived key saying it
is alive, refreshed a few times per liveness TTL, together with the list of
what it holds (opaque strings; the executor stores its running turns there).
A session lease is only as good as its holder's liveness: ``acquire`` takes a
lease that is free, **or** one whose holder's liveness lapsed (a dead or frozen
process), so a crashed or stopped executor's sessions move on within about a
liveness TTL rather than a lease TTL, whatever the broker still believes. The
lease TTL stays the backstop for an owner that lost Redis altogether.
``reap`` hands the holdings of each owner whose liveness lapsed to exactly one
caller (who publishes those turns again, since a frozen process keeps its
broker deliveries); ``leave`` forgets an owner that stops cleanly.

An owner that never beat counts as dead: an executor beats before it takes
any lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Lease(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease if nobody holds it or its holder is not alive. Not
        reentrant: the owner itself is refused while its lease is live."""
        ...

    async def refresh(self, key: str, owner: str, ttl: float) -> bool: ...

    async def release(self, key: str, owner: str) -> bool: ...

    async def holder(self, key: str) -> str | None:
        """The lease's owner, when it holds the lease and is alive."""
        ...

    async def beat(self, owner: str, ttl: float, holding: Sequence[str]) -> None:
        """``owner`` is alive for ``ttl`` more seconds and holds ``holding``."""
        ...

    async def live_holdings(self) -> set[str]:
        """What the owners that are alive hold (each one's last ``beat``)."""
        ...

    async def reap(self) -> list[str]:
        """What owners whose liveness lapsed held; each owner's holdings go to
        exactly one caller, and the owner is forgotten until it beats again."""
        ...

    async def leave(self, owner: str) -> None:
        """``owner`` stopped cleanly: forget its liveness and holdings."""
        ...
