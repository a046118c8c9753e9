"""RunningTurns: a cancel that arrives before its run starts is not lost."""

from __future__ import annotations

import asyncio

from turnrelay.executor import registry
from turnrelay.executor.registry import RunningTurns, StopReason


async def _forever() -> None:
    await asyncio.sleep(3600)


async def test_cancel_before_the_run_is_registered_stops_it_at_once() -> None:
    running = RunningTurns()
    running.cancel("t1")  # the broadcast raced the claim
    task = asyncio.create_task(_forever())
    run = running.add("t1", task)
    assert run.reason is StopReason.CANCEL
    await asyncio.sleep(0)
    assert task.cancelled() or task.cancelling()
    other = asyncio.create_task(_forever())
    assert running.add("t2", other).reason is None  # only that turn
    other.cancel()


async def test_cancel_of_a_running_turn_stops_it() -> None:
    running = RunningTurns()
    task = asyncio.create_task(_forever())
    run = running.add("t1", task)
    running.cancel("t1")
    assert run.reason is StopReason.CANCEL
    running.remove("t1")
    # consumed: a later run of another attempt is not pre-cancelled by the old one
    again = asyncio.create_task(_forever())
    assert running.add("t1", again).reason is None
    again.cancel()


def test_remembered_cancels_are_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(registry, "CANCEL_MEMORY_SIZE", 3)
    running = RunningTurns()
    for i in range(10):
        running.cancel(f"t{i}")
    assert list(running._cancelled) == ["t7", "t8", "t9"]
