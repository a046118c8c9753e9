"""The TurnQueue contract, run against the in-memory twin and RabbitMQ.

``queues`` makes any number of started TurnQueues on one backend (one shared
``MemoryBroker``, or one RabbitMQ deployment name unique to the test), each one
consumer, and shuts them all down afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest

from tests.conftest import skip_or_fail
from turnrelay.errors import BackendUnavailable, ConfigError, PublishFailed
from turnrelay.queue.base import Delivery, TurnMessage, TurnQueue
from turnrelay.queue.memory import MemoryBroker, MemoryTurnQueue
from turnrelay.queue.rabbitmq import RabbitTurnQueue
from turnrelay.queue.topology import DELIVERY_LIMIT, Topology

REQUEUE_DELAY = 1.0
# Long enough for a RabbitMQ delivery to arrive on a loaded machine; a "nothing
# arrives" assertion waits this long.
QUIET = 0.5

Factory = Callable[[], Awaitable[TurnQueue]]


def turn(n: int | str) -> TurnMessage:
    return TurnMessage(turn_id=f"turn-{n}", session_id=f"session-{n}")


async def received(queue: TurnQueue, within: float = 5.0) -> Delivery:
    delivery = await queue.receive(timeout=within)
    assert delivery is not None, "no delivery arrived"
    return delivery


async def _delete_rabbit_topology(url: str, topology: Topology) -> None:
    connection = await aio_pika.connect(url, timeout=5)
    async with connection:
        channel = await connection.channel()
        queues = [topology.turns_queue.name, topology.delay_queue(REQUEUE_DELAY).name]
        for queue in queues:
            await channel.queue_delete(queue, if_unused=False, if_empty=False)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange.name)


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def queues(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Factory]:
    made: list[TurnQueue] = []
    broker = MemoryBroker()
    url = request.getfixturevalue("amqp_url") if request.param == "rabbitmq" else ""
    name = f"test-{unique}"

    async def make() -> TurnQueue:
        queue: TurnQueue
        if request.param == "memory":
            queue = MemoryTurnQueue(broker)
        else:
            queue = RabbitTurnQueue(url, name=name, consumer_id=f"{unique}-{len(made)}")
        await queue.startup()
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.shutdown()
    if request.param == "rabbitmq":
        await _delete_rabbit_topology(url, Topology(name))


async def test_publish_receive_ack(queues: Factory) -> None:
    queue = await queues()
    await queue.publish(turn(1))
    await queue.start_consuming(prefetch=1)
    delivery = await received(queue)
    assert delivery.message == turn(1)
    assert delivery.redelivered is False
    await delivery.ack()
    assert await queue.receive(timeout=QUIET) is None


async def test_receive_times_out_with_none(queues: Factory) -> None:
    queue = await queues()
    await queue.start_consuming(prefetch=1)
    started = time.monotonic()
    assert await queue.receive(timeout=0.3) is None
    assert 0.25 <= time.monotonic() - started < 2.0


async def test_unacked_delivery_is_redelivered_after_shutdown(queues: Factory) -> None:
    first, second = await queues(), await queues()
    await first.publish(turn(1))
    await first.start_consuming(prefetch=1)
    delivery = await received(first)
    assert delivery.redelivered is False
    await first.shutdown()

    await second.start_consuming(prefetch=1)
    again = await received(second)
    assert again.message == turn(1)
    assert again.redelivered is True
    await again.ack()
    with pytest.raises(BackendUnavailable):
        await delivery.ack()  # its consumer is gone; the message already went back


async def test_prefetch_bounds_unacked_deliveries(queues: Factory) -> None:
    queue = await queues()
    for n in range(3):
        await queue.publish(turn(n))
    await queue.start_consuming(prefetch=2)
    a, b = await received(queue), await received(queue)
    assert await queue.receive(timeout=QUIET) is None
    await a.ack()
    c = await received(queue)
    assert {a.message, b.message, c.message} == {turn(0), turn(1), turn(2)}
    await b.ack()
    await c.ack()


async def test_requeue_delivers_again_after_the_delay_without_holding_a_slot(
    queues: Factory,
) -> None:
    queue = await queues()
    await queue.publish(turn("delayed"))
    await queue.publish(turn("next"))
    await queue.start_consuming(prefetch=1)
    delayed = await received(queue)
    assert delayed.message == turn("delayed")
    started = time.monotonic()
    await delayed.requeue(REQUEUE_DELAY)

    # The waiting message frees its prefetch slot at once.
    following = await received(queue, within=REQUEUE_DELAY * 0.5)
    assert following.message == turn("next")
    await following.ack()

    again = await received(queue, within=REQUEUE_DELAY + 2)
    elapsed = time.monotonic() - started
    assert again.message == turn("delayed")
    assert REQUEUE_DELAY * 0.5 <= elapsed <= REQUEUE_DELAY + 2
    await again.ack()


async def test_stop_consuming_stops_new_deliveries(queues: Factory) -> None:
    queue, other = await queues(), await queues()
    await queue.publish(turn(1))
    await queue.start_consuming(prefetch=2)
    held = await received(queue)
    await queue.stop_consuming()
    await queue.publish(turn(2))
    assert await queue.receive(timeout=QUIET) is None
    await held.ack()  # a held delivery can still be acked

    await other.start_consuming(prefetch=2)
    delivery = await received(other)
    assert delivery.message == turn(2)
    assert delivery.redelivered is False
    await delivery.ack()
    assert await other.receive(timeout=QUIET) is None


async def test_stop_consuming_gives_back_unreceived_deliveries(queues: Factory) -> None:
    queue, other = await queues(), await queues()
    await queue.publish(turn(1))
    await queue.start_consuming(prefetch=1)
    await asyncio.sleep(QUIET)  # let the delivery reach the consumer's buffer
    await queue.stop_consuming()

    await other.start_consuming(prefetch=1)
    delivery = await received(other)
    assert delivery.message == turn(1)
    await delivery.ack()


async def test_cancel_reaches_every_subscriber(queues: Factory) -> None:
    first, second, api = await queues(), await queues(), await queues()
    await first.start_consuming(prefetch=1)
    await second.start_consuming(prefetch=1)
    await api.publish_cancel("turn-9")

    async def first_cancel(queue: TurnQueue) -> str:
        cancels: Any = queue.cancels()
        async with contextlib.aclosing(cancels):
            async with asyncio.timeout(5):
                return str(await anext(cancels))

    assert await first_cancel(first) == "turn-9"
    assert await first_cancel(second) == "turn-9"


async def test_cancels_end_at_shutdown(queues: Factory) -> None:
    queue = await queues()
    await queue.start_consuming(prefetch=1)

    async def collect() -> list[str]:
        return [turn_id async for turn_id in queue.cancels()]

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.1)
    await queue.shutdown()
    async with asyncio.timeout(5):
        assert await task == []


async def test_messages_from_several_publishers_arrive_once(queues: Factory) -> None:
    publishers = [await queues() for _ in range(3)]
    consumers = [await queues() for _ in range(2)]
    for consumer in consumers:
        await consumer.start_consuming(prefetch=3)
    expected = {turn(f"{p}-{n}") for p in range(3) for n in range(15)}

    async def publish_all(index: int, publisher: TurnQueue) -> None:
        for n in range(15):
            await publisher.publish(turn(f"{index}-{n}"))

    seen: list[TurnMessage] = []

    async def drain(consumer: TurnQueue) -> None:
        while (delivery := await consumer.receive(timeout=QUIET * 2)) is not None:
            seen.append(delivery.message)
            await delivery.ack()

    await asyncio.gather(*(publish_all(i, p) for i, p in enumerate(publishers)))
    await asyncio.gather(*(drain(c) for c in consumers))
    assert sorted(m.turn_id for m in seen) == sorted(m.turn_id for m in expected)


async def test_ping(queues: Factory) -> None:
    queue = await queues()
    await queue.ping()


# -- RabbitMQ only ---------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_unreachable_broker_raises_promptly() -> None:
    queue = RabbitTurnQueue("amqp://guest:guest@127.0.0.1:1/", connect_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await queue.startup()
    with pytest.raises(BackendUnavailable):
        await queue.publish(turn(1))
    assert time.monotonic() - started < 5.0
    await queue.shutdown()


@pytest.mark.rabbitmq
async def test_turns_queue_is_a_durable_quorum_queue(amqp_url: str, unique: str) -> None:
    name = f"test-{unique}"
    queue = RabbitTurnQueue(amqp_url, name=name)
    await queue.startup()
    turns = queue.topology.turns_queue.name
    try:
        connection = await aio_pika.connect(amqp_url, timeout=5)
        async with connection:
            # Re-declaring with the same properties is accepted; any other type or
            # durability is refused as inequivalent, which proves what exists.
            channel = await connection.channel()
            declared = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
            await channel.declare_queue(turns, durable=True, arguments=declared)
            refused: list[dict[str, Any]] = [
                {"durable": True, "arguments": {**declared, "x-queue-type": "classic"}},
                {"durable": False, "arguments": declared},
            ]
            for kwargs in refused:
                channel = await connection.channel()
                with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                    await channel.declare_queue(turns, **kwargs)
    finally:
        await queue.shutdown()
        await _delete_rabbit_topology(amqp_url, Topology(name))


@pytest.mark.rabbitmq
async def test_unroutable_publish_raises_publish_failed(amqp_url: str, unique: str) -> None:
    name = f"test-{unique}"
    queue = RabbitTurnQueue(amqp_url, name=name)
    await queue.startup()
    try:
        connection = await aio_pika.connect(amqp_url, timeout=5)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue.topology.turns_queue.name)
        with pytest.raises(PublishFailed):
            await queue.publish(turn(1))
    finally:
        await queue.shutdown()
        await _delete_rabbit_topology(amqp_url, Topology(name))


def _close_connections_named(connection_name: str) -> int:
    """Force-close the broker side of our connections, as a broker restart would."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = [line.split()[0] for line in listed.splitlines() if connection_name in line]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "close_connection", pid, "test"], check=True)
    return len(pids)


@pytest.mark.rabbitmq
@pytest.mark.slow
async def test_survives_a_dropped_connection(amqp_url: str, unique: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        skip_or_fail("rabbitmqctl is not on PATH to drop the connection with")
    name = f"test-{unique}"
    queue = RabbitTurnQueue(amqp_url, name=name, consumer_id=f"{unique}-drop")
    await queue.startup()
    try:
        await queue.start_consuming(prefetch=2)
        await queue.publish(turn(1))
        held = await received(queue)
        assert await asyncio.to_thread(_close_connections_named, queue.consumer_id) == 1

        # Publishing waits for the reconnect; consuming and cancels resume.
        await queue.publish(turn(2))
        arrived = {}
        for _ in range(2):
            delivery = await received(queue, within=15)
            arrived[delivery.message.turn_id] = delivery.redelivered
            await delivery.ack()
        assert arrived == {"turn-1": True, "turn-2": False}
        with pytest.raises(BackendUnavailable):
            await held.ack()  # its channel died with the connection
        # The cancel queue is re-declared and re-bound on its own channel; a cancel
        # published before that finishes is not delivered (fanout to no queue),
        # which the database flag covers in production. What must hold is that
        # cancels resume: publish until one arrives.
        cancels: Any = queue.cancels()
        async with contextlib.aclosing(cancels):
            first = asyncio.ensure_future(anext(cancels))
            try:
                async with asyncio.timeout(15):
                    while not first.done():
                        await queue.publish_cancel("turn-3")
                        await asyncio.wait([first], timeout=0.5)
                assert first.result() == "turn-3"
            finally:
                first.cancel()
    finally:
        await queue.shutdown()
        await _delete_rabbit_topology(amqp_url, Topology(name))


@pytest.mark.rabbitmq
async def test_turns_queue_has_an_explicit_delivery_limit(amqp_url: str, unique: str) -> None:
    """RabbitMQ 4 defaults a quorum queue to 20 deliveries, and 3.x reads -1 as
    "drop at the first redelivery": the limit must be declared, and high."""
    if shutil.which("rabbitmqctl") is None:
        skip_or_fail("rabbitmqctl is not on PATH to read the queue's arguments with")
    name = f"test-{unique}"
    queue = RabbitTurnQueue(amqp_url, name=name)
    await queue.startup()
    try:
        listed = (
            await asyncio.to_thread(
                subprocess.run,
                ["rabbitmqctl", "-q", "list_queues", "name", "arguments"],
                capture_output=True,
                text=True,
                check=True,
            )
        ).stdout
        line = next(row for row in listed.splitlines() if row.startswith(f"{name}.turns\t"))
        assert "x-delivery-limit" in line and str(DELIVERY_LIMIT) in line
        # and it behaves: a message returned 25 times still comes back
        await queue.publish(turn(1))
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            raw = await channel.get_queue(f"{name}.turns", ensure=False)
            for _ in range(25):
                got = None
                for _ in range(50):
                    got = await raw.get(fail=False)
                    if got is not None:
                        break
                    await asyncio.sleep(0.05)
                assert got is not None, "the message was dropped by the broker"
                await got.nack(requeue=True)
    finally:
        await queue.shutdown()
        await _delete_rabbit_topology(amqp_url, Topology(name))


@pytest.mark.rabbitmq
async def test_a_queue_declared_differently_is_a_clear_config_error(
    amqp_url: str, unique: str
) -> None:
    name = f"test-{unique}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            f"{name}.turns", durable=True, arguments={"x-queue-type": "quorum"}
        )
    queue = RabbitTurnQueue(amqp_url, name=name)
    try:
        with pytest.raises(ConfigError, match="other arguments"):
            await queue.startup()
    finally:
        await queue.shutdown()
        await _delete_rabbit_topology(amqp_url, Topology(name))


async def test_a_receiver_cancelled_as_it_is_handed_a_delivery_loses_nothing(
    queues: Factory,
) -> None:
    """Idle receivers are woken one per delivery; one cancelled right after its
    wake-up passes the delivery on at once instead of stranding it."""
    queue = await queues()
    await queue.start_consuming(prefetch=10)
    receivers = [asyncio.create_task(queue.receive(timeout=3)) for _ in range(6)]
    await asyncio.sleep(0.05)  # all six are waiting
    await queue.publish(turn(1))
    first = receivers[0]
    first.cancel()  # possibly the one just woken for it
    with contextlib.suppress(asyncio.CancelledError):
        taken = await first
    if first.cancelled() or taken is None:
        # Another receiver has it well before their timeout.
        done, _ = await asyncio.wait(receivers[1:], timeout=1.5, return_when="FIRST_COMPLETED")
        assert done, "the delivery was stranded with the cancelled receiver"
        (taken,) = [t.result() for t in done]
    assert taken is not None and taken.message == turn(1)
    await taken.ack()
    for r in receivers[1:]:
        r.cancel()


async def test_one_delivery_among_many_idle_receivers_reaches_exactly_one(
    queues: Factory,
) -> None:
    """An executor's workers all wait on one consumer: a delivery goes to one of
    them, and the rest keep waiting until their own timeout answers ``None``."""
    queue = await queues()
    await queue.start_consuming(prefetch=10)
    receivers = [asyncio.create_task(queue.receive(timeout=2.0)) for _ in range(40)]
    await asyncio.sleep(0.05)
    await queue.publish(turn(1))
    results = await asyncio.gather(*receivers)
    got = [d for d in results if d is not None]
    assert [d.message for d in got] == [turn(1)]
    await got[0].ack()
