"""The EventLog on Redis Streams: one stream per turn.

The stream key is ``{prefix}:turn:{<turn_id>}:log``; the braces are a Redis
Cluster hash tag, so every key of one turn lives on one shard. Each frame is an
entry with the explicit id ``0-<seq>`` and the fields ``d`` (the chunk's JSON)
and ``t`` (``"1"`` on the terminal frame only). Redis refuses an ``XADD`` whose id
is not above the stream's top id, which is the fence against a stale writer.

A batch is appended by one Lua script (one round trip, atomic). It refuses a
batch starting above seq 1 on a stream that does not exist (``LogLost``: Redis
restarted empty under a running turn) unless the writer says it is restarting
the log. Its frames are
checked to be increasing before sending, so only the first ``XADD`` can hit the
fence, and when it does nothing of the batch is written. A plain pipeline would
let the tail of a stale batch land after a newer writer's frames.

Blocking reads run on their own connection pool, so an ``XREAD BLOCK`` never
holds a connection that appends and lease refreshes are waiting for. Cancelling
a blocked read makes redis-py drop that connection rather than return it to
the pool with a reply still in flight.

Neither pool retries on its own: redis-py's default retry would resend an
``XADD`` whose first attempt may have landed, and report that writer stale.
Idempotent commands are retried once here on a connection error (a pooled
connection that died with a Redis restart).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from turnrelay.errors import BackendUnavailable, LogLost, NotFound, StaleWriter
from turnrelay.events.base import Frame, LogInfo

T = TypeVar("T")

# A command that has not answered after this long means Redis is in trouble;
# the caller (heartbeat, API) gets BackendUnavailable instead of hanging.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
# A blocking XREAD is given this much longer than its BLOCK before it counts
# as a hung connection.
BLOCK_GRACE = 5.0

_APPEND = """
if ARGV[2] ~= '1' and tonumber(ARGV[3]) > 1 and redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('LOGLOST the event log is gone')
end
local n = 0
for i = 3, #ARGV, 3 do
  if ARGV[i + 2] == '1' then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[i], 'd', ARGV[i + 1], 't', '1')
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[i], 'd', ARGV[i + 1])
  end
  n = n + 1
end
return n
"""


def redact_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@contextmanager
def redis_errors(safe_url: str) -> Iterator[None]:
    """Translate redis-py errors into ``BackendUnavailable`` at the boundary."""
    try:
        yield
    except (rexc.ConnectionError, rexc.TimeoutError, TimeoutError) as exc:
        raise BackendUnavailable(f"Redis unreachable at {safe_url}: {exc}") from exc
    except rexc.RedisError as exc:
        raise BackendUnavailable(f"Redis at {safe_url} failed: {exc}") from exc


async def retry_once(call: Callable[[], Awaitable[T]]) -> T:
    """Run an idempotent command, again once if its connection had died."""
    try:
        return await call()
    except rexc.ConnectionError:
        return await call()


def connect(url: str, *, socket_timeout: float | None) -> aioredis.Redis:
    """A client that never retries behind the caller's back (see module docstring)."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )
    return client


def _seq(entry_id: str) -> int:
    return int(entry_id.partition("-")[2])


def _frame(entry_id: str, fields: Mapping[str, str]) -> Frame:
    return Frame(seq=_seq(entry_id), data=fields["d"], terminal=fields.get("t") == "1")


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisEventLog:
    def __init__(self, url: str, *, key_prefix: str = "turnrelay", maxlen: int = 100_000) -> None:
        self._url = url
        self._safe_url = redact_url(url)
        self._prefix = key_prefix
        self._maxlen = maxlen
        self._client: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._append_script: Any = None

    def key(self, turn_id: str) -> str:
        return f"{self._prefix}:turn:{{{turn_id}}}:log"

    async def startup(self) -> None:
        # No I/O: a process starts while Redis is down and reports it on /ready.
        if self._client is None:
            self._client = connect(self._url, socket_timeout=SOCKET_TIMEOUT)
            self._blocking = connect(self._url, socket_timeout=None)
            self._append_script = self._client.register_script(_APPEND)

    async def shutdown(self) -> None:
        clients = [c for c in (self._client, self._blocking) if c is not None]
        self._client = self._blocking = self._append_script = None
        for client in clients:
            await client.aclose()

    @property
    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisEventLog used before startup()")
        return self._client

    async def append(self, turn_id: str, frames: Sequence[Frame], *, restart: bool = False) -> None:
        if not frames:
            return
        previous = 0
        for frame in frames:
            if frame.seq <= previous:
                raise StaleWriter(
                    f"turn {turn_id}: frame seq {frame.seq} is not greater than {previous}"
                )
            previous = frame.seq
        args: list[str | int] = [self._maxlen, "1" if restart else "0"]
        for frame in frames:
            args += [frame.seq, frame.data, "1" if frame.terminal else "0"]
        if self._append_script is None:
            raise RuntimeError("RedisEventLog used before startup()")
        with redis_errors(self._safe_url):
            try:
                await self._append_script(keys=[self.key(turn_id)], args=args)
            except rexc.ResponseError as exc:
                if "LOGLOST" in str(exc):
                    raise LogLost(
                        f"turn {turn_id}: the event log is gone before seq {frames[0].seq}"
                    ) from exc
                if "equal or smaller" not in str(exc):
                    raise
                raise StaleWriter(
                    f"turn {turn_id}: seq {frames[0].seq} is not above the log's last frame"
                ) from exc

    async def info(self, turn_id: str) -> LogInfo:
        client = self._redis
        with redis_errors(self._safe_url):
            try:
                raw = await retry_once(lambda: client.xinfo_stream(self.key(turn_id)))
            except rexc.ResponseError as exc:
                if "no such key" not in str(exc).lower():
                    raise
                raise NotFound(f"turn {turn_id} has no event log") from exc
        first, last = raw.get("first-entry"), raw.get("last-entry")
        if not first or not last:
            return LogInfo(first_seq=0, last_seq=0, terminal=False)
        last_frame = _frame(*last)
        return LogInfo(
            first_seq=_seq(first[0]), last_seq=last_frame.seq, terminal=last_frame.terminal
        )

    async def read(
        self, cursors: Mapping[str, int], *, block: float | None = None, count: int = 500
    ) -> dict[str, list[Frame]]:
        if not cursors:
            # XREAD needs a stream; with none, nothing can arrive before the timeout.
            if block and block > 0:
                await asyncio.sleep(block)
            return {}
        turn_of = {self.key(turn_id): turn_id for turn_id in cursors}
        streams: dict[Any, Any] = {
            self.key(turn_id): f"0-{after}" for turn_id, after in cursors.items()
        }
        raw: Any
        with redis_errors(self._safe_url):
            if block and block > 0:
                blocking = self._blocking
                if blocking is None:
                    raise RuntimeError("RedisEventLog used before startup()")
                async with asyncio.timeout(block + BLOCK_GRACE):
                    raw = await retry_once(
                        lambda: blocking.xread(streams, count=count, block=_ms(block))
                    )
            else:
                client = self._redis
                raw = await retry_once(lambda: client.xread(streams, count=count))
        result: dict[str, list[Frame]] = {}
        for key, entries in raw or []:
            if entries:
                result[turn_of[key]] = [_frame(entry_id, fields) for entry_id, fields in entries]
        return result

    async def touch(self, turn_id: str, ttl: float) -> None:
        client = self._redis
        with redis_errors(self._safe_url):
            await retry_once(lambda: client.pexpire(self.key(turn_id), _ms(ttl)))

    async def expire(self, turn_id: str, retention: float) -> None:
        await self.touch(turn_id, retention)

    async def delete(self, turn_id: str) -> None:
        client = self._redis
        with redis_errors(self._safe_url):
            await retry_once(lambda: client.delete(self.key(turn_id)))

    async def ping(self) -> None:
        client = self._redis
        with redis_errors(self._safe_url):
            await retry_once(client.ping)
