"""The in-process TurnQueue twin: one asyncio loop, no server.

It models what the executor relies on in RabbitMQ, so the embedded mode and the
distributed mode behave alike:

* a delivery that is neither acked nor requeued goes back to the queue, flagged
  ``redelivered``, when its consumer shuts down (as when a channel closes);
* ``prefetch`` bounds the unacked deliveries a consumer holds;
* ``requeue(delay)`` frees the consumer's slot at once and makes the message
  ready again after ``delay`` as a fresh message (``redelivered=False``, as a
  message dead-lettered back from RabbitMQ's delay queue arrives);
* ``stop_consuming`` returns the deliveries it took but nobody received, so
  another consumer can take them during a long graceful shutdown;
* cancels reach every subscriber of the broker; a queue subscribes when it
  starts consuming (or first iterates ``cancels()``), and ``cancels()`` ends at
  ``shutdown``.

A ``MemoryBroker`` holds the queue; each ``MemoryTurnQueue`` is one consumer
(one "channel") on it, so several executors in one process can share a broker.
``MemoryTurnQueue()`` creates a private broker.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from turnrelay.errors import BackendUnavailable
from turnrelay.queue.base import TurnMessage
from turnrelay.queue.handoff import Handoff


@dataclass(slots=True)
class _Envelope:
    message: TurnMessage
    # Delivered before without being settled: the next delivery is a redelivery.
    delivered: bool = False


class MemoryBroker:
    """The shared state: ready messages, consumers, cancel subscribers."""

    def __init__(self) -> None:
        self._ready: deque[_Envelope] = deque()
        self._consumers: list[MemoryTurnQueue] = []
        self._next_consumer = 0
        self._cancel_subscribers: list[asyncio.Queue[str | None]] = []

    @property
    def ready_count(self) -> int:
        """Messages waiting for a consumer (not delayed, not outstanding)."""
        return len(self._ready)

    def _publish(self, message: TurnMessage) -> None:
        self._ready.append(_Envelope(message))
        self._dispatch()

    def _return(self, envelopes: list[_Envelope]) -> None:
        # Returned messages keep their place at the head, in their original order.
        self._ready.extendleft(reversed(envelopes))
        self._dispatch()

    def _add_consumer(self, consumer: MemoryTurnQueue) -> None:
        self._consumers.append(consumer)
        self._dispatch()

    def _remove_consumer(self, consumer: MemoryTurnQueue) -> None:
        if consumer in self._consumers:
            self._consumers.remove(consumer)

    def _dispatch(self) -> None:
        """Hand ready messages round-robin to consumers with a free prefetch slot."""
        while self._ready:
            consumer = self._pick_consumer()
            if consumer is None:
                return
            consumer._deliver(self._ready.popleft())

    def _pick_consumer(self) -> MemoryTurnQueue | None:
        count = len(self._consumers)
        for offset in range(count):
            index = (self._next_consumer + offset) % count
            consumer = self._consumers[index]
            if consumer._has_capacity():
                self._next_consumer = (index + 1) % count
                return consumer
        return None

    def _subscribe_cancels(self) -> asyncio.Queue[str | None]:
        subscriber: asyncio.Queue[str | None] = asyncio.Queue()
        self._cancel_subscribers.append(subscriber)
        return subscriber

    def _unsubscribe_cancels(self, subscriber: asyncio.Queue[str | None]) -> None:
        if subscriber in self._cancel_subscribers:
            self._cancel_subscribers.remove(subscriber)
        subscriber.put_nowait(None)  # ends the subscriber's ``cancels()``

    def _publish_cancel(self, turn_id: str) -> None:
        for subscriber in self._cancel_subscribers:
            subscriber.put_nowait(turn_id)


class MemoryDelivery:
    def __init__(self, consumer: MemoryTurnQueue, envelope: _Envelope, redelivered: bool) -> None:
        self._consumer = consumer
        self._envelope = envelope
        self._redelivered = redelivered
        self._settled = False

    @property
    def message(self) -> TurnMessage:
        return self._envelope.message

    @property
    def redelivered(self) -> bool:
        return self._redelivered

    async def ack(self) -> None:
        self._settle()

    async def requeue(self, delay: float) -> None:
        self._settle()
        fresh = _Envelope(self._envelope.message)
        broker = self._consumer._broker
        asyncio.get_running_loop().call_later(max(delay, 0.0), broker._return, [fresh])

    def _settle(self) -> None:
        if self._settled:
            raise RuntimeError(f"delivery of turn {self.message.turn_id} is already settled")
        if self._consumer._closed:
            # Like an ack on a closed channel: the message already went back.
            raise BackendUnavailable("the consumer of this delivery has shut down")
        self._settled = True
        self._consumer._settled(self)


class MemoryTurnQueue:
    """One consumer on a ``MemoryBroker`` (a private one unless given)."""

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self._broker = broker if broker is not None else MemoryBroker()
        self._prefetch = 0
        self._consuming = False
        self._closed = False
        # Taken from the broker, not yet handed out by ``receive``.
        self._buffer: Handoff[MemoryDelivery] = Handoff()
        # Taken from the broker and not yet acked or requeued (buffered ones included).
        self._outstanding: list[MemoryDelivery] = []
        self._cancels: asyncio.Queue[str | None] | None = None

    @property
    def broker(self) -> MemoryBroker:
        return self._broker

    async def startup(self) -> None:
        self._closed = False

    async def shutdown(self) -> None:
        await self.stop_consuming()
        self._closed = True
        returned = [delivery._envelope for delivery in self._outstanding]
        self._outstanding.clear()
        self._broker._return(returned)
        if self._cancels is not None:
            self._broker._unsubscribe_cancels(self._cancels)
            self._cancels = None

    async def publish(self, message: TurnMessage) -> None:
        self._broker._publish(message)

    async def start_consuming(self, prefetch: int) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self._subscribe_cancels()
        self._prefetch = prefetch
        if not self._consuming:
            self._consuming = True
            self._buffer.open()
            self._broker._add_consumer(self)

    async def receive(
        self,
        timeout: float | None = None,
    ) -> MemoryDelivery | None:
        return await self._buffer.get(timeout)

    async def stop_consuming(self) -> None:
        if not self._consuming:
            return
        self._consuming = False
        self._broker._remove_consumer(self)
        unreceived = self._buffer.take_all()
        self._buffer.close()
        for delivery in unreceived:
            delivery._settled = True
            self._outstanding.remove(delivery)
        self._broker._return([delivery._envelope for delivery in unreceived])

    async def publish_cancel(self, turn_id: str) -> None:
        self._broker._publish_cancel(turn_id)

    async def cancels(self) -> AsyncIterator[str]:
        subscriber = self._subscribe_cancels()
        while True:
            turn_id = await subscriber.get()
            if turn_id is None:
                return
            yield turn_id

    async def ping(self) -> None:
        if self._closed:
            raise BackendUnavailable("the in-memory queue is shut down")

    # -- called by the broker and by deliveries ---------------------------------

    def _subscribe_cancels(self) -> asyncio.Queue[str | None]:
        if self._cancels is None:
            self._cancels = self._broker._subscribe_cancels()
        return self._cancels

    def _has_capacity(self) -> bool:
        return self._consuming and len(self._outstanding) < self._prefetch

    def _deliver(self, envelope: _Envelope) -> None:
        delivery = MemoryDelivery(self, envelope, redelivered=envelope.delivered)
        envelope.delivered = True
        self._outstanding.append(delivery)
        self._buffer.put(delivery)

    def _settled(self, delivery: MemoryDelivery) -> None:
        self._outstanding.remove(delivery)
        self._broker._dispatch()
