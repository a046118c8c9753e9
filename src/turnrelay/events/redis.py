"""The EventLog on Redis Streams: one stream per turn.

The stream key is ``{prefix}:turn:{<turn_id>}:log`` and its epoch (the fence)
is the hash ``{prefix}:turn:{<turn_id>}:epoch`` (fields ``e``, the epoch, and
``b``, the log's last seq when that epoch claimed it); the braces are a Redis
Cluster hash tag, so every key of one turn lives on one shard and one script
can touch both. Each frame is an entry with the explicit id ``0-<seq>`` and the
fields ``d`` (the chunk's JSON) and ``t`` (``"1"`` on the terminal frame only).

``claim`` and ``append`` are Lua scripts (one round trip, atomic). ``append``
refuses a lower epoch than the stored one (``STALE``), a batch starting above
seq 1 on a stream that does not exist (``LOGLOST``: Redis restarted empty under
a running turn) unless the writer says it is restarting the log, and a batch at
seqs the stream already holds, unless it is the same epoch's identical batch
sent again (then it is a no-op: the answer to a lost reply). Its frames are
checked to be increasing before sending, so only the first ``XADD`` can meet
the stream's top id, and when anything is refused nothing of the batch is
written. Every append and touch sets both keys' expiry, so no key of a turn is
ever left without one.

Blocking reads run on their own bounded connection pool, so an ``XREAD BLOCK``
never holds a connection that appends and lease refreshes are waiting for, and a
burst of readers waits for a connection rather than opening one each.
Cancelling a blocked read makes redis-py drop that connection, so readers are
not cancelled to be told something: a read with a wake channel also reads the
stream ``{prefix}:wake:<channel>`` from the last entry it saw, and ``wake``
adds an entry there, which ends the blocked read at once (or the next one, if
none is blocked yet).

Neither pool retries on its own: redis-py's default retry would resend
commands behind the caller's back. Idempotent commands are retried once here on
a connection error (a pooled connection that died with a Redis restart); an
``append`` is idempotent too, and its caller resends it.
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

from turnrelay.errors import (
    BackendUnavailable,
    LogLost,
    NotFound,
    StaleWriter,
    TurnrelayError,
)
from turnrelay.events.base import Frame, LogInfo, check_increasing

T = TypeVar("T")

# A command that has not answered after this long means Redis is in trouble;
# the caller (heartbeat, API) gets BackendUnavailable instead of hanging.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
# A blocking XREAD is given this much longer than its BLOCK before it counts
# as a hung connection.
BLOCK_GRACE = 5.0
# Blocking reads share a bounded pool: a burst of readers waits for a
# connection (up to BLOCK_GRACE) instead of opening one each.
BLOCKING_POOL = 8
# A wake channel's stream keeps a few entries and outlives an idle hour.
WAKE_MAXLEN = 16
WAKE_TTL_MS = 3_600_000

# KEYS: stream, epoch hash. ARGV: maxlen, restart flag, epoch, ttl ms, then
# (seq, data, terminal flag) per frame.
_APPEND = """
local epoch = tonumber(ARGV[3])
local current = tonumber(redis.call('HGET', KEYS[2], 'e') or '-1')
if current > epoch then
  return redis.error_reply('STALE epoch ' .. ARGV[3] .. ' is behind ' .. current)
end
local first = tonumber(ARGV[5])
local exists = redis.call('EXISTS', KEYS[1]) == 1
if not exists and ARGV[2] ~= '1' and first > 1 then
  return redis.error_reply('LOGLOST the event log is gone')
end
local last = 0
if exists then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = tonumber(string.match(info[i + 1], '-(%d+)$'))
    end
  end
end
if first <= last then
  local base = tonumber(redis.call('HGET', KEYS[2], 'b') or '0')
  local final = tonumber(ARGV[#ARGV - 2])
  if current == epoch and first > base and final <= last then
    local held = redis.call('XRANGE', KEYS[1], '0-' .. first, '0-' .. first)
    if held[1] and held[1][2][2] == ARGV[6] then
      return 0
    end
  end
  return redis.error_reply('STALE seq ' .. first .. ' is not above ' .. last)
end
if current < epoch then
  redis.call('HSET', KEYS[2], 'e', epoch, 'b', first - 1)
end
for i = 5, #ARGV, 3 do
  if ARGV[i + 2] == '1' then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[i], 'd', ARGV[i + 1], 't', '1')
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[i], 'd', ARGV[i + 1])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: stream, epoch hash. ARGV: epoch, ttl ms. Returns {exists, first, last, terminal}.
_CLAIM = """
local epoch = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[2], 'e') or '-1')
if current > epoch then
  return redis.error_reply('STALE epoch ' .. ARGV[1] .. ' is behind ' .. current)
end
local exists = redis.call('EXISTS', KEYS[1]) == 1
local first, last, terminal = 0, 0, 0
if exists then
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if head[1] then
    first = tonumber(string.match(head[1][1], '-(%d+)$'))
    last = tonumber(string.match(top[1][1], '-(%d+)$'))
    if top[1][2][3] == 't' then terminal = 1 end
  end
end
if current < epoch then
  redis.call('HSET', KEYS[2], 'e', epoch, 'b', last)
end
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return {exists and 1 or 0, first, last, terminal}
"""

# KEYS: stream, epoch hash. ARGV: ttl ms. Returns 1 when the stream exists.
_TOUCH = """
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('PEXPIRE', KEYS[1], ARGV[1])
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


def connect(
    url: str, *, socket_timeout: float | None, max_connections: int | None = None
) -> aioredis.Redis:
    """A client that never retries behind the caller's back (see module docstring).
    With ``max_connections``, callers beyond it wait for a free connection."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }
    if max_connections is not None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=BLOCK_GRACE, **options
        )
        return aioredis.Redis.from_pool(pool)  # owns the pool: closing it closes the pool
    client: aioredis.Redis = aioredis.Redis.from_url(url, **options)
    return client


def _refused(turn_id: str, exc: rexc.ResponseError) -> TurnrelayError:
    """What a script's error reply means, in the error tree."""
    text = str(exc)
    if "LOGLOST" in text:
        return LogLost(f"turn {turn_id}: the event log is gone")
    if "STALE" in text:
        return StaleWriter(f"turn {turn_id}: {text.partition('STALE ')[2]}")
    return BackendUnavailable(f"Redis refused a write to turn {turn_id}: {text}")


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
        self._claim_script: Any = None
        self._touch_script: Any = None
        self._wake_seen: dict[str, str] = {}  # wake channel -> last entry id read

    def key(self, turn_id: str) -> str:
        return f"{self._prefix}:turn:{{{turn_id}}}:log"

    def epoch_key(self, turn_id: str) -> str:
        return f"{self._prefix}:turn:{{{turn_id}}}:epoch"

    def wake_key(self, channel: str) -> str:
        return f"{self._prefix}:wake:{channel}"

    async def startup(self) -> None:
        # No I/O: a process starts while Redis is down and reports it on /ready.
        if self._client is None:
            self._client = connect(self._url, socket_timeout=SOCKET_TIMEOUT)
            self._blocking = connect(self._url, socket_timeout=None, max_connections=BLOCKING_POOL)
            self._append_script = self._client.register_script(_APPEND)
            self._claim_script = self._client.register_script(_CLAIM)
            self._touch_script = self._client.register_script(_TOUCH)

    async def shutdown(self) -> None:
        clients = [c for c in (self._client, self._blocking) if c is not None]
        self._client = self._blocking = None
        self._append_script = self._claim_script = self._touch_script = None
        for client in clients:
            await client.aclose()

    @property
    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisEventLog used before startup()")
        return self._client

    def _scripts(self) -> tuple[Any, Any, Any]:
        if self._append_script is None:
            raise RuntimeError("RedisEventLog used before startup()")
        return self._append_script, self._claim_script, self._touch_script

    async def claim(self, turn_id: str, epoch: int, ttl: float) -> LogInfo:
        _, claim, _ = self._scripts()
        keys = [self.key(turn_id), self.epoch_key(turn_id)]
        with redis_errors(self._safe_url):
            try:
                raw = await retry_once(lambda: claim(keys=keys, args=[epoch, _ms(ttl)]))
            except rexc.ResponseError as exc:
                raise _refused(turn_id, exc) from exc
        exists, first, last, terminal = (int(v) for v in raw)
        return LogInfo(first, last, bool(terminal), exists=bool(exists))

    async def append(
        self,
        turn_id: str,
        frames: Sequence[Frame],
        *,
        epoch: int,
        ttl: float,
        restart: bool = False,
    ) -> None:
        if not frames:
            return
        check_increasing(turn_id, frames)
        args: list[str | int] = [self._maxlen, "1" if restart else "0", epoch, _ms(ttl)]
        for frame in frames:
            args += [frame.seq, frame.data, "1" if frame.terminal else "0"]
        append, _, _ = self._scripts()
        keys = [self.key(turn_id), self.epoch_key(turn_id)]
        with redis_errors(self._safe_url):
            try:
                await append(keys=keys, args=args)
            except rexc.ResponseError as exc:
                raise _refused(turn_id, exc) from exc

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
        self,
        cursors: Mapping[str, int],
        *,
        block: float | None = None,
        count: int = 500,
        wake: str | None = None,
    ) -> dict[str, list[Frame]]:
        turn_of = {self.key(turn_id): turn_id for turn_id in cursors}
        streams: dict[Any, Any] = {
            self.key(turn_id): f"0-{after}" for turn_id, after in cursors.items()
        }
        blocking_read = bool(block and block > 0)
        wake_key = self.wake_key(wake) if wake is not None and blocking_read else None
        if wake_key is not None:
            assert wake is not None
            streams[wake_key] = self._wake_seen.get(wake, "0-0")
        if not streams:
            # XREAD needs a stream; with none, nothing can arrive before the timeout.
            if blocking_read:
                assert block is not None
                await asyncio.sleep(block)
            return {}
        raw: Any
        with redis_errors(self._safe_url):
            if blocking_read:
                assert block is not None
                blocking = self._blocking
                if blocking is None:
                    raise RuntimeError("RedisEventLog used before startup()")
                async with asyncio.timeout(block + 2 * BLOCK_GRACE):
                    raw = await retry_once(
                        lambda: blocking.xread(streams, count=count, block=_ms(block))
                    )
            else:
                client = self._redis
                raw = await retry_once(lambda: client.xread(streams, count=count))
        result: dict[str, list[Frame]] = {}
        for key, entries in raw or []:
            if key == wake_key:
                assert wake is not None
                if entries:
                    self._wake_seen[wake] = entries[-1][0]
            elif entries:
                result[turn_of[key]] = [_frame(entry_id, fields) for entry_id, fields in entries]
        return result

    async def wake(self, channel: str) -> None:
        client = self._redis
        key = self.wake_key(channel)

        async def send() -> None:
            async with client.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {"w": "1"}, maxlen=WAKE_MAXLEN, approximate=True)
                pipe.pexpire(key, WAKE_TTL_MS)
                await pipe.execute()

        with redis_errors(self._safe_url):
            await retry_once(send)

    async def touch(self, turn_id: str, ttl: float) -> bool:
        _, _, touch = self._scripts()
        keys = [self.key(turn_id), self.epoch_key(turn_id)]
        with redis_errors(self._safe_url):
            return bool(await retry_once(lambda: touch(keys=keys, args=[_ms(ttl)])))

    async def expire(self, turn_id: str, retention: float) -> None:
        await self.touch(turn_id, retention)

    async def delete(self, turn_id: str) -> None:
        client = self._redis
        keys = [self.key(turn_id), self.epoch_key(turn_id)]
        with redis_errors(self._safe_url):
            await retry_once(lambda: client.delete(*keys))

    async def ping(self) -> None:
        client = self._redis
        with redis_errors(self._safe_url):
            await retry_once(client.ping)
