"""Handoff: deliveries taken from the broker, handed to an executor's workers.

An executor has ``NUM_WORKERS`` workers (hundreds, in a busy deployment) all
waiting in ``receive`` on one consumer. An ``asyncio.Event`` set per delivery
would wake every one of them to find the single delivery already gone (a herd
per message: 500 wake-ups for each of 500 turns submitted at once), and
``asyncio.timeout`` or ``asyncio.wait`` around every idle poll costs a task
cancellation or two tasks each time. Here an item wakes exactly one waiter,
the one that has waited longest, and a poll's timeout is one timer handle.

Each item goes to exactly one ``get``. A waiter that is woken but cancelled
before it runs passes its wake on, so no item sits unclaimed while another
waiter sleeps.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from typing import Generic, TypeVar

from turnrelay.waiters import release

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self) -> None:
        self._items: deque[T] = deque()
        # Insertion-ordered, O(1) removal: a waiter that timed out leaves at once.
        self._waiters: OrderedDict[asyncio.Future[None], None] = OrderedDict()
        self._open = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> int:
        """Receivers blocked in ``get``."""
        return len(self._waiters)

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        """``get`` answers ``None`` once the items are gone; every waiter wakes."""
        self._open = False
        waiters, self._waiters = self._waiters, OrderedDict()
        for waiter in waiters:
            release(waiter)

    def put(self, item: T) -> None:
        self._items.append(item)
        self._wake_one()

    def take_all(self) -> list[T]:
        """The items nobody received (and they are gone from here)."""
        items = list(self._items)
        self._items.clear()
        return items

    async def get(self, timeout: float | None = None) -> T | None:
        """The next item; ``None`` after ``timeout`` seconds, or once closed and empty."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._items:
                return self._items.popleft()
            if not self._open:
                return None
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters[waiter] = None
            timer = None if remaining is None else loop.call_later(remaining, release, waiter)
            try:
                await waiter
            except BaseException:
                self._waiters.pop(waiter, None)
                if waiter.done() and not waiter.cancelled() and self._items:
                    self._wake_one()  # woken, then cancelled before it ran: pass it on
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            self._waiters.pop(waiter, None)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter, _ = self._waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(None)
                return
