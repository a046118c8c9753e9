"""SQLite on the event loop's own thread, for the embedded store.

aiosqlite runs every call of a connection in a thread of its own and hands the
result back through the loop: two thread wake-ups per call. A statement here
takes microseconds; the hand-over took 0.3 ms per call on this project's
machines, and SQLAlchemy makes two or three calls per statement, so a turn's
25-odd statements spent most of their time crossing threads. This connection
keeps aiosqlite's interface (which SQLAlchemy's ``sqlite+aiosqlite`` dialect
drives) but runs each call where it is awaited.

A call that blocks would now block the loop, so nothing may make one wait:

* in WAL mode readers never wait for writers, nor writers for readers;
* writers of this process wait for each other on ``writer_lock`` (an asyncio
  lock per database file and loop), before ``BEGIN IMMEDIATE``, so no writer
  of this process ever meets another one's write lock inside SQLite. Another
  *process* writing the same file still can make a writer wait, up to the busy
  timeout: the embedded store belongs to one process (``turnrelay serve``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite


class _Inline:
    """aiosqlite's queue to its thread, replaced: each call runs as it is put
    (SQLAlchemy's dialect also puts calls on it directly)."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:  # handed to the awaiting caller, as aiosqlite does
            if future is not None:
                future.set_exception(exc)
        else:
            if future is not None:
                future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    """An ``aiosqlite.Connection`` without its thread: calls run inline."""

    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _Inline()  # type: ignore[assignment]

    def __await__(self) -> Any:
        return self._connect().__await__()  # (no thread to start)


def connect(database: str, **kwargs: Any) -> InlineConnection:
    """What SQLAlchemy's aiosqlite dialect calls (as ``async_creator_fn``)."""
    kwargs["check_same_thread"] = False  # closed by the pool, maybe elsewhere
    return InlineConnection(lambda: sqlite3.connect(database, **kwargs))


_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def lock_key(database: str) -> str:
    """The file that names ``database``'s writer lock (resolved once, by the store)."""
    return str(Path(database).expanduser().resolve()) if database != ":memory:" else database


def writer_lock(key: str) -> asyncio.Lock:
    """The lock this process's writers of the file ``key`` take before they begin."""
    per_loop = _locks.setdefault(asyncio.get_running_loop(), {})
    lock = per_loop.get(key)
    if lock is None:
        lock = per_loop[key] = asyncio.Lock()
    return lock
