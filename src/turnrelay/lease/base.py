"""The Lease port.

A lease is a key with an owner token and a time-to-live. ``acquire`` succeeds
only when nobody holds the key; ``refresh`` and ``release`` succeed only for the
current owner (in Redis: ``SET NX PX`` plus owner-checked Lua scripts). A refresh
that answers ``False`` means the lease was lost (it expired and someone else may
hold it): the holder must stop writing at once. Booleans here are answers, not
error sentinels: a backend failure raises ``BackendUnavailable``.
"""

from __future__ import annotations

from typing import Protocol


class Lease(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def acquire(self, key: str, owner: str, ttl: float) -> bool: ...

    async def refresh(self, key: str, owner: str, ttl: float) -> bool: ...

    async def release(self, key: str, owner: str) -> bool: ...

    async def holder(self, key: str) -> str | None: ...
