"""The Lease on Redis: ``SET key owner NX PX ttl`` plus owner-checked Lua.

Keys (the braces are Redis Cluster hash tags):

    {prefix}:lease:{<key>}      the lease: value = owner, PX = lease TTL
    {prefix}:alive:{<owner>}    an owner's liveness: PX = liveness TTL
    {prefix}:holds:{<owner>}    what the owner holds (JSON list), outliving its liveness
    {prefix}:owners             the set of owners that beat (for ``reap``)

``refresh`` and ``release`` compare the owner and act in one script, so an
owner whose lease expired and was taken can never extend or delete the new
owner's lease. An expired lease is gone: ``refresh`` then answers ``False``
even when nobody took it, since the old holder cannot know that nobody wrote in
between. ``acquire`` is one ``SET NX`` when the lease is free; when it is held,
a script takes it over only if the holder read a moment ago still holds it and
its liveness key is gone (both keys named in the script's ``KEYS``). ``reap``
runs one script per lapsed owner that deletes its holdings and membership and
returns them, so exactly one reaper gets them. ``acquire``, ``release`` and the
takeover are not retried on a connection error: a retry after a lost reply to a
successful first attempt would answer ``False`` although the caller got (or
gave up) the lease.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from turnrelay.events.redis import SOCKET_TIMEOUT, connect, redact_url, redis_errors, retry_once

# How long an owner's holdings outlive its last beat, for a reaper to find them.
HOLDINGS_TTL = 600.0

_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

# KEYS: lease, the holder's alive key. ARGV: holder, new owner, ttl ms.
_TAKEOVER = """
if redis.call('get', KEYS[1]) == ARGV[1] and redis.call('exists', KEYS[2]) == 0 then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS: alive, holds, owners. ARGV: owner. The holdings of a lapsed owner, once.
_REAP = """
if redis.call('exists', KEYS[1]) == 1 then
  return false
end
local held = redis.call('get', KEYS[2])
redis.call('del', KEYS[2])
redis.call('srem', KEYS[3], ARGV[1])
return held or '[]'
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisLease:
    def __init__(self, url: str, *, key_prefix: str = "turnrelay") -> None:
        self._url = url
        self._safe_url = redact_url(url)
        self._prefix = key_prefix
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    def key(self, key: str) -> str:
        return f"{self._prefix}:lease:{{{key}}}"

    def alive_key(self, owner: str) -> str:
        return f"{self._prefix}:alive:{{{owner}}}"

    def holds_key(self, owner: str) -> str:
        return f"{self._prefix}:holds:{{{owner}}}"

    @property
    def owners_key(self) -> str:
        return f"{self._prefix}:owners"

    async def startup(self) -> None:
        # No I/O: a process starts while Redis is down and reports it on /ready.
        if self._client is None:
            self._client = connect(self._url, socket_timeout=SOCKET_TIMEOUT)
            for name, body in (
                ("refresh", _REFRESH),
                ("release", _RELEASE),
                ("takeover", _TAKEOVER),
                ("reap", _REAP),
            ):
                self._scripts[name] = self._client.register_script(body)

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None:
            await client.aclose()

    @property
    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisLease used before startup()")
        return self._client

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        client = self._redis
        with redis_errors(self._safe_url):
            if await client.set(self.key(key), owner, nx=True, px=_ms(ttl)):
                return True
            holder: Any = await client.get(self.key(key))
            if holder is None:  # released in between: try once more
                return bool(await client.set(self.key(key), owner, nx=True, px=_ms(ttl)))
            if holder == owner:
                return False
            took = await self._script("takeover")(
                keys=[self.key(key), self.alive_key(holder)], args=[holder, owner, _ms(ttl)]
            )
        return bool(took)

    def _script(self, name: str) -> Any:
        _ = self._redis  # started?
        return self._scripts[name]

    async def refresh(self, key: str, owner: str, ttl: float) -> bool:
        script = self._script("refresh")
        args = [owner, _ms(ttl)]
        with redis_errors(self._safe_url):
            return bool(await retry_once(lambda: script(keys=[self.key(key)], args=args)))

    async def release(self, key: str, owner: str) -> bool:
        script = self._script("release")
        with redis_errors(self._safe_url):
            return bool(await script(keys=[self.key(key)], args=[owner]))

    async def holder(self, key: str) -> str | None:
        client = self._redis
        with redis_errors(self._safe_url):
            value: Any = await retry_once(lambda: client.get(self.key(key)))
            if value is None:
                return None
            alive = await retry_once(lambda: client.exists(self.alive_key(value)))
        return str(value) if alive else None

    async def beat(self, owner: str, ttl: float, holding: Sequence[str]) -> None:
        client = self._redis
        with redis_errors(self._safe_url):
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(self.alive_key(owner), "1", px=_ms(ttl))
                pipe.set(
                    self.holds_key(owner), json.dumps(list(holding)), px=_ms(max(ttl, HOLDINGS_TTL))
                )
                pipe.sadd(self.owners_key, owner)
                await pipe.execute()

    async def live_holdings(self) -> set[str]:
        client = self._redis
        held: set[str] = set()
        with redis_errors(self._safe_url):
            owners: Any = await retry_once(lambda: client.smembers(self.owners_key))
            if not owners:
                return held
            ordered = sorted(owners)
            async with client.pipeline(transaction=False) as pipe:
                for owner in ordered:
                    pipe.exists(self.alive_key(owner))
                    pipe.get(self.holds_key(owner))
                answers = await pipe.execute()
        for alive, items in zip(answers[::2], answers[1::2], strict=True):
            if alive and items:
                held.update(str(item) for item in json.loads(items))
        return held

    async def reap(self) -> list[str]:
        client = self._redis
        script = self._script("reap")
        reaped: list[str] = []
        with redis_errors(self._safe_url):
            owners: Any = await retry_once(lambda: client.smembers(self.owners_key))
            if not owners:
                return reaped
            ordered = sorted(owners)
            async with client.pipeline(transaction=False) as pipe:
                for owner in ordered:
                    pipe.exists(self.alive_key(owner))
                alive = await pipe.execute()
            for owner, is_alive in zip(ordered, alive, strict=True):
                if is_alive:
                    continue
                held = await script(
                    keys=[self.alive_key(owner), self.holds_key(owner), self.owners_key],
                    args=[owner],
                )
                if held is not None:
                    reaped += [str(item) for item in json.loads(held)]
        return reaped

    async def leave(self, owner: str) -> None:
        client = self._redis
        with redis_errors(self._safe_url):
            async with client.pipeline(transaction=False) as pipe:
                pipe.delete(self.alive_key(owner), self.holds_key(owner))
                pipe.srem(self.owners_key, owner)
                await pipe.execute()
