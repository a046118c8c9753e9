"""The sweeper against a real RabbitMQ: it republishes a head whose publish was
never confirmed, once, and never a head that waits in the broker behind a backlog."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest

from tests.contract.test_turn_queue import _delete_rabbit_topology
from turnrelay.api.control import TurnControl
from turnrelay.api.hub import StreamHub
from turnrelay.events.memory import MemoryEventLog
from turnrelay.executor.worker import Executor
from turnrelay.lease.memory import MemoryLease
from turnrelay.metrics import Metrics
from turnrelay.queue.rabbitmq import RabbitTurnQueue
from turnrelay.queue.topology import Topology
from turnrelay.settings import Settings
from turnrelay.storage.memory import MemoryObjectStore
from turnrelay.store.base import Multitask, NewTurn
from turnrelay.store.migrate import migrate
from turnrelay.store.sql import SqlChatStore

pytestmark = pytest.mark.rabbitmq


@dataclass
class Rig:
    store: SqlChatStore
    queue: RabbitTurnQueue
    control: TurnControl
    executor: Executor
    amqp_url: str

    async def ready_messages(self) -> int:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(
                self.queue.topology.turns_queue.name, passive=True
            )
            return int(declared.declaration_result.message_count or 0)


def five_minutes_ago() -> datetime:
    return datetime.now(UTC) - timedelta(minutes=5)


@pytest.fixture
async def rig(tmp_path: Path, amqp_url: str, unique: str) -> AsyncIterator[Rig]:
    url = f"sqlite+aiosqlite:///{tmp_path}/db.sqlite"
    await migrate(url)
    # Every turn looks old: past any sweeper cutoff.
    store = SqlChatStore(url, clock=five_minutes_ago)
    await store.startup()
    name = f"test-{unique}"
    settings = Settings(
        _env_file=None, model="fake:x", database_url=url, broker_url=amqp_url, namespace=name
    )
    queue = RabbitTurnQueue(amqp_url, name=name)
    await queue.startup()
    events = MemoryEventLog()
    metrics = Metrics("executor", 1)
    executor = Executor(
        settings=settings,
        store=store,
        events=events,
        lease=MemoryLease(),
        queue=queue,
        runtimes={},
        metrics=metrics,
        grace=1,
    )
    control = TurnControl(
        settings=settings,
        store=store,
        events=events,
        queue=queue,
        metrics=metrics,
        hub=StreamHub(events),
        objects=MemoryObjectStore(),
    )
    try:
        yield Rig(store, queue, control, executor, amqp_url)
    finally:
        await queue.shutdown()
        await store.shutdown()
        await _delete_rabbit_topology(amqp_url, Topology(name))


async def test_a_backlog_waiting_in_the_broker_is_not_republished(rig: Rig) -> None:
    sessions = [await rig.store.create_session("u") for _ in range(3)]
    for s in sessions:  # no executor consumes: the messages wait in the broker
        await rig.control.submit(
            s.id, "u", "hi", model="fake:x", message_id=None, multitask=Multitask.ENQUEUE
        )
    assert await rig.ready_messages() == 3
    for _ in range(3):
        assert await rig.executor.sweep() == 0
    assert await rig.ready_messages() == 3  # one message per session, still


async def test_a_head_whose_publisher_died_is_republished_once(rig: Rig) -> None:
    s = await rig.store.create_session("u")
    # The API committed the dispatched turn and died before publishing it.
    await rig.store.submit_turn(
        NewTurn(session_id=s.id, user_id="u", text="hi", model="fake:x", dispatch_if_idle=True)
    )
    assert await rig.ready_messages() == 0
    assert await rig.executor.sweep() == 1
    assert await rig.executor.sweep() == 0
    await asyncio.sleep(0.2)
    assert await rig.ready_messages() == 1


async def test_a_running_turn_of_a_live_executor_is_not_republished(rig: Rig) -> None:
    """Its session lease lapsed (the executor was slow to start beating it,
    under load), but the executor is alive and holds the turn: republishing it
    would start a second attempt that fences out a healthy one."""
    s = await rig.store.create_session("u")
    await rig.control.submit(
        s.id, "u", "hi", model="fake:x", message_id=None, multitask=Multitask.ENQUEUE
    )
    (turn,) = await rig.store.active_turns(s.id)
    assert await rig.store.start_turn(turn.id, 0) is not None
    await rig.executor.lease.beat("busy-executor", 60, [f"{turn.id} {s.id}"])
    before = await rig.ready_messages()
    assert await rig.executor.sweep() == 0
    await asyncio.sleep(0.2)
    assert await rig.ready_messages() == before
    # Once that executor stops beating, the turn is an orphan: republished.
    await rig.executor.lease.leave("busy-executor")
    assert await rig.executor.sweep() == 1
