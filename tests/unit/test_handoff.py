"""Handoff: an executor's deliveries, each handed to exactly one waiting worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from turnrelay.queue.base import TurnMessage
from turnrelay.queue.handoff import Handoff
from turnrelay.queue.memory import MemoryTurnQueue


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@contextlib.contextmanager
def count_futures(loop: asyncio.AbstractEventLoop) -> Iterator[list[int]]:
    """Count the futures made on ``loop`` meanwhile (every wait makes one)."""
    made = [0]
    create = loop.create_future

    def counting() -> asyncio.Future[object]:
        made[0] += 1
        return create()

    loop.create_future = counting  # type: ignore[method-assign]
    try:
        yield made
    finally:
        del loop.create_future  # the loop's own method again


async def test_a_delivery_wakes_one_of_many_idle_workers_not_all() -> None:
    """With hundreds of workers on one consumer, a wake-up per worker per
    delivery was a herd: each woken worker found the delivery gone and waited
    again (a new future each). Now only the receiver that gets it wakes."""
    queue = MemoryTurnQueue()
    await queue.start_consuming(prefetch=500)
    workers = [asyncio.create_task(queue.receive(timeout=30)) for _ in range(200)]
    await settle()
    with count_futures(asyncio.get_running_loop()) as made:
        await queue.publish(TurnMessage(turn_id="t1", session_id="s1"))
        await settle()
    done = [w for w in workers if w.done()]
    assert len(done) == 1 and done[0].result() is not None
    assert made[0] == 0, f"{made[0]} idle workers woke up and waited again"
    await queue.stop_consuming()
    rest = await asyncio.gather(*workers)
    assert sum(1 for r in rest if r is not None) == 1  # stop wakes the others with None
    await queue.shutdown()


async def test_items_go_to_waiters_in_the_order_they_waited() -> None:
    handoff: Handoff[int] = Handoff()
    handoff.open()
    first = asyncio.create_task(handoff.get(5))
    await settle()
    second = asyncio.create_task(handoff.get(5))
    await settle()
    handoff.put(1)
    handoff.put(2)
    assert (await first, await second) == (1, 2)
    assert handoff.waiting == 0


async def test_a_timed_out_get_answers_none_and_leaves_no_waiter() -> None:
    handoff: Handoff[int] = Handoff()
    handoff.open()
    assert await handoff.get(0.02) is None
    assert handoff.waiting == 0
    handoff.put(7)  # nobody waits: it stays for the next get
    assert await handoff.get(0) == 7


async def test_a_waiter_cancelled_after_its_wake_passes_the_item_on() -> None:
    handoff: Handoff[int] = Handoff()
    handoff.open()
    first = asyncio.create_task(handoff.get(5))
    second = asyncio.create_task(handoff.get(5))
    await settle()
    handoff.put(1)  # wakes `first`
    first.cancel()  # before it ran
    await settle()
    assert first.cancelled()
    assert await asyncio.wait_for(second, 1) == 1
    assert handoff.waiting == 0 and len(handoff) == 0


async def test_close_wakes_every_waiter_but_items_come_first() -> None:
    handoff: Handoff[int] = Handoff()
    assert await handoff.get(5) is None  # not opened: answers at once
    handoff.open()
    waiters = [asyncio.create_task(handoff.get(None)) for _ in range(3)]
    await settle()
    handoff.close()
    assert await asyncio.gather(*waiters) == [None, None, None]
    handoff.put(3)
    assert await handoff.get(None) == 3  # closed but not empty
    assert handoff.take_all() == []
