"""Lease takeover and fencing in one process: a frozen owner that wakes up after
another executor took its turn writes nothing, whoever writes first, and the new
owner is never left stuck (the in-memory twins on a manual clock, SQLite).

The real-process versions (SIGSTOP, kill -9) are in tests/chaos/."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from turnrelay.clock import ManualClock
from turnrelay.events.base import LogInfo
from turnrelay.events.memory import MemoryEventLog
from turnrelay.executor.registry import RunningTurns
from turnrelay.executor.runner import TurnRunner
from turnrelay.lease.memory import MemoryLease
from turnrelay.metrics import Metrics
from turnrelay.queue.base import TurnMessage
from turnrelay.queue.memory import MemoryBroker, MemoryDelivery, MemoryTurnQueue
from turnrelay.runtime.base import RuntimeEvent, StepFinish, StepStart, TextDelta, TurnContext
from turnrelay.settings import Settings
from turnrelay.store.base import Multitask, NewTurn, TurnStatus
from turnrelay.store.migrate import migrate
from turnrelay.store.sql import SqlChatStore

LIVENESS = 3.0


class PausingRuntime:
    """Attempt 1 writes a word, then waits for ``resume`` (a frozen process) and
    writes another; later attempts answer at once."""

    def __init__(self) -> None:
        self.resume = asyncio.Event()
        self.attempts: list[int] = []

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def run(self, ctx: TurnContext) -> AsyncGenerator[RuntimeEvent, None]:
        self.attempts.append(ctx.attempt)
        yield StepStart()
        if ctx.attempt == 1:
            yield TextDelta("before-freeze ")
            await self.resume.wait()
            yield TextDelta("after-takeover ")
            await asyncio.sleep(3600)
        yield TextDelta("attempt-2-answer")
        yield StepFinish()


class ClaimHookLog:
    """B's view of the shared log: right after B claims it, A wakes up and writes."""

    def __init__(self, inner: MemoryEventLog, on_claim: asyncio.Event) -> None:
        self.inner = inner
        self.on_claim = on_claim

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def claim(self, turn_id: str, epoch: int, ttl: float) -> LogInfo:
        info = await self.inner.claim(turn_id, epoch, ttl)
        self.on_claim.set()
        await asyncio.sleep(0.2)  # A's writes land here, before B's first flush
        return info


@dataclass
class World:
    store: SqlChatStore
    log: MemoryEventLog
    lease: MemoryLease
    clock: ManualClock
    broker: MemoryBroker
    settings: Settings
    runtime: PausingRuntime

    def runner(self, owner: str, events: object, queue: MemoryTurnQueue) -> TurnRunner:
        return TurnRunner(
            settings=self.settings,
            store=self.store,
            events=events,  # type: ignore[arg-type]
            lease=self.lease,
            queue=queue,
            runtimes={"fake": self.runtime},
            owner=owner,
            running=RunningTurns(),
            metrics=Metrics("executor", 1),
        )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    url = f"sqlite+aiosqlite:///{tmp_path}/db.sqlite"
    await migrate(url)
    store = SqlChatStore(url)
    await store.startup()
    clock = ManualClock()
    settings = Settings(_env_file=None, model="fake:x", database_url=url, liveness_ttl=LIVENESS)
    try:
        yield World(
            store,
            MemoryEventLog(),
            MemoryLease(clock),
            clock,
            MemoryBroker(),
            settings,
            PausingRuntime(),
        )
    finally:
        await store.shutdown()


async def submit(store: SqlChatStore) -> tuple[str, str]:
    s = await store.create_session("u")
    r = await store.submit_turn(
        NewTurn(
            session_id=s.id,
            user_id="u",
            text="hi",
            model="fake:x",
            multitask=Multitask.ENQUEUE,
            dispatch_if_idle=True,
        )
    )
    return s.id, r.turn.id


async def delivery(queue: MemoryTurnQueue, turn_id: str, session_id: str) -> MemoryDelivery:
    await queue.start_consuming(1)
    await queue.publish(TurnMessage(turn_id, session_id))
    got = await queue.receive(1)
    assert got is not None
    return got


async def wait_for(predicate, bound: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_frozen_owner_that_writes_first_after_the_takeover_writes_nothing(
    world: World,
) -> None:
    session_id, turn_id = await submit(world.store)
    qa, qb = MemoryTurnQueue(world.broker), MemoryTurnQueue(world.broker)
    await world.lease.beat("A", LIVENESS, [])
    a = world.runner("A", world.log, qa)
    da = await delivery(qa, turn_id, session_id)
    ta = asyncio.create_task(a.handle(da))
    await wait_for(lambda: world.runtime.attempts == [1])
    await asyncio.sleep(0.05)  # A wrote its first word

    # A freezes: no beat for a liveness TTL. B, alive, gets the turn's message.
    world.clock.advance(LIVENESS + 1)
    await world.lease.beat("B", LIVENESS, [])
    b = world.runner("B", ClaimHookLog(world.log, world.runtime.resume), qb)
    db = await delivery(qb, turn_id, session_id)
    await asyncio.wait_for(b.handle(db), 10)  # A wakes up right after B's claim

    assert db._settled  # B's delivery was acked, not left hanging
    turn = await world.store.get_turn(turn_id)
    assert (turn.status, turn.attempt) == (TurnStatus.COMPLETED, 2)
    frames = (await world.log.read({turn_id: 0}))[turn_id]
    text = "".join(json.loads(f.data).get("delta", "") for f in frames)
    assert "after-takeover" not in text  # A's frame after the takeover never landed
    assert text == "before-freeze attempt-2-answer"
    assert json.loads(frames[-1].data)["type"] == "finish"
    assert [f.seq for f in frames] == list(range(1, len(frames) + 1))

    # A's own run stops (its lease and its log are gone), and its delivery is settled.
    await asyncio.wait_for(ta, 10)
    assert da._settled
    assert await world.lease.holder(f"session:{session_id}") is None
    messages = await world.store.messages(session_id)
    assert messages[1].content == "attempt-2-answer"


async def test_a_live_owner_keeps_its_turn(world: World) -> None:
    """No false takeover: while A beats, B's delivery is requeued, not run."""
    session_id, turn_id = await submit(world.store)
    qa, qb = MemoryTurnQueue(world.broker), MemoryTurnQueue(world.broker)
    await world.lease.beat("A", LIVENESS, [])
    a = world.runner("A", world.log, qa)
    ta = asyncio.create_task(a.handle(await delivery(qa, turn_id, session_id)))
    await wait_for(lambda: world.runtime.attempts == [1])
    world.clock.advance(LIVENESS - 0.5)
    await world.lease.beat("A", LIVENESS, [])  # A is alive (a stall shorter than the TTL)
    world.clock.advance(LIVENESS - 0.5)
    await world.lease.beat("B", LIVENESS, [])
    b = world.runner("B", world.log, qb)
    db = await delivery(qb, turn_id, session_id)
    await b.handle(db)
    assert db._settled and world.runtime.attempts == [1]  # requeued, never started
    assert (await world.store.get_turn(turn_id)).attempt == 1
    ta.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ta
