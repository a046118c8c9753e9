"""The Lease on Redis: ``SET key owner NX PX ttl`` plus owner-checked Lua.

The key is ``{prefix}:lease:{<key>}`` (a Redis Cluster hash tag on the lease
key). ``refresh`` and ``release`` compare the owner and act in one script, so
an owner whose lease expired and was taken can never extend or delete the new
owner's lease. An expired lease is gone: ``refresh`` then answers ``False``
even when nobody took it, since the old holder cannot know that nobody wrote in
between. ``acquire`` is not reentrant. ``acquire`` and ``release`` are not
retried on a connection error: a retry after a lost reply to a successful first
attempt would answer ``False`` although the caller got (or gave up) the lease.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from turnrelay.events.redis import SOCKET_TIMEOUT, connect, redact_url, redis_errors, retry_once

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


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisLease:
    def __init__(self, url: str, *, key_prefix: str = "turnrelay") -> None:
        self._url = url
        self._safe_url = redact_url(url)
        self._prefix = key_prefix
        self._client: aioredis.Redis | None = None
        self._refresh: Any = None
        self._release: Any = None

    def key(self, key: str) -> str:
        return f"{self._prefix}:lease:{{{key}}}"

    async def startup(self) -> None:
        # No I/O: a process starts while Redis is down and reports it on /ready.
        if self._client is None:
            self._client = connect(self._url, socket_timeout=SOCKET_TIMEOUT)
            self._refresh = self._client.register_script(_REFRESH)
            self._release = self._client.register_script(_RELEASE)

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        self._refresh = self._release = None
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
            return bool(await client.set(self.key(key), owner, nx=True, px=_ms(ttl)))

    async def refresh(self, key: str, owner: str, ttl: float) -> bool:
        _ = self._redis
        args = [owner, _ms(ttl)]
        with redis_errors(self._safe_url):
            return bool(await retry_once(lambda: self._refresh(keys=[self.key(key)], args=args)))

    async def release(self, key: str, owner: str) -> bool:
        _ = self._redis
        with redis_errors(self._safe_url):
            return bool(await self._release(keys=[self.key(key)], args=[owner]))

    async def holder(self, key: str) -> str | None:
        client = self._redis
        with redis_errors(self._safe_url):
            value: Any = await retry_once(lambda: client.get(self.key(key)))
        return None if value is None else str(value)
