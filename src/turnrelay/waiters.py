"""Waking a bare ``asyncio`` future: the cheap wait of hot paths.

Where hundreds of tasks wait (an executor's idle workers, an API's streams), a
future woken by whoever has something for it, with a timer handle for its
timeout, costs far less than ``asyncio.wait_for`` (a task per wait) or an
``Event`` shared by many waiters (every one wakes).
"""

from __future__ import annotations

import asyncio


def release(waiter: asyncio.Future[None]) -> None:
    """Wake ``waiter`` unless it is done already (also a timer's callback)."""
    if not waiter.done():
        waiter.set_result(None)
