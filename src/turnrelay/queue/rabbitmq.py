"""The TurnQueue on RabbitMQ, through aio-pika.

The topology is data (``turnrelay.queue.topology``): a durable quorum queue of
turns behind a direct exchange, a fanout exchange of cancels with one queue per
consumer, and self-deleting delay queues for ``requeue``.

One robust connection (it reconnects after a broker restart and re-declares what
it declared) carries three channels, so that a failure on one does not take the
others down:

* publishing: publisher confirms, ``mandatory`` turns. ``publish`` returns only
  once the broker confirmed the message; a nack, a return (no queue bound) or no
  confirm within ``publish_timeout`` raise ``PublishFailed``. When the link
  drops under a publish, it waits for the robust connection and publishes
  again, up to the same timeout (so a copy may arrive twice: at-least-once).
* consuming turns: QoS ``prefetch_count=prefetch``; deliveries go into an
  internal buffer that ``receive`` reads.
* cancels: a ``no_ack`` consumer on this consumer's cancel queue. It is bound
  when the consumer starts consuming turns (or first iterates ``cancels()``), so
  an API process that only publishes holds no cancel queue, and an executor
  misses no cancel from the moment ``start_consuming`` returns. It stays bound
  through ``stop_consuming`` (turns still running can be cancelled) and
  ``cancels()`` ends at ``shutdown``.

Ack timing is the executor's policy. One broker setting bounds it: RabbitMQ
closes the channel of a consumer that holds a delivery unacked longer than its
``consumer_timeout`` (default 30 minutes), which would redeliver a turn that is
still running. The executor's ``TURN_TIMEOUT`` (25 minutes) is kept below it.

``requeue(delay)`` publishes a copy of the message into the delay queue for that
delay (confirmed) and then acks the original, so the waiting turn holds no
prefetch slot. The copy comes back through the turns exchange as a new message
(``redelivered`` is false). Between the two steps a crash leaves both: turns are
delivered at least once anyway.

A delivery whose channel closed (a reconnect) is stale: the broker already gave
its message back to the queue. ``receive`` skips such deliveries, and acking
one raises ``BackendUnavailable``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    AbstractRobustQueue,
)

from turnrelay.errors import BackendUnavailable, ConfigError, PublishFailed
from turnrelay.queue.base import TurnMessage
from turnrelay.queue.handoff import Handoff
from turnrelay.queue.topology import TURN_ROUTING_KEY, ExchangeSpec, QueueSpec, Topology

log = logging.getLogger(__name__)

# How long ``startup`` (and ``ping``) wait for the broker: an API that cannot
# reach it should answer 503 quickly rather than hang a request.
CONNECT_TIMEOUT = 5.0
# How long a publish may wait for a (re)connection and the broker's confirm.
PUBLISH_TIMEOUT = 10.0
# AMQP heartbeat (seconds): the broker closes the connection of a peer that
# missed two. A frozen executor's connection looks alive otherwise, and the
# broker goes on pushing turns into its prefetch, where they wait until it
# wakes; at 5 s they come back within ~10 s, while a 1-2 s event-loop stall
# costs nothing. (The turns it was running are taken over sooner, by liveness.)
HEARTBEAT = 5

# The link dropped (not the broker refusing): worth publishing again once the
# robust connection restores it, within ``publish_timeout``.
_LINK_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)
# Pause between publish attempts while the connection is being restored.
RETRY_PAUSE = 0.2

# What a failure talking to the broker looks like, once aio-pika has its say.
_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def default_consumer_id() -> str:
    """Unique per process and instance, readable in ``rabbitmqctl list_consumers``."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def encode(message: TurnMessage) -> bytes:
    return json.dumps({"turn_id": message.turn_id, "session_id": message.session_id}).encode()


TRACE_HEADERS = ("traceparent", "tracestate")


def decode(body: bytes, headers: Mapping[str, Any] | None = None) -> TurnMessage:
    data = json.loads(body)
    trace = {
        k: v.decode() if isinstance(v, bytes) else v
        for k, v in (headers or {}).items()
        if k in TRACE_HEADERS and isinstance(v, str | bytes)
    }
    return TurnMessage(
        turn_id=str(data["turn_id"]), session_id=str(data["session_id"]), trace=trace
    )


class RabbitDelivery:
    def __init__(
        self, queue: RabbitTurnQueue, incoming: AbstractIncomingMessage, message: TurnMessage
    ) -> None:
        self._queue = queue
        self._incoming = incoming
        self._message = message
        self._settled = False

    @property
    def message(self) -> TurnMessage:
        return self._message

    @property
    def redelivered(self) -> bool:
        return bool(self._incoming.redelivered)

    @property
    def stale(self) -> bool:
        """The channel it came on is closed: the broker has already requeued it."""
        try:
            self._incoming.channel  # noqa: B018 - raises once the channel is closed
        except aiormq.exceptions.ChannelInvalidStateError:
            return True
        return False

    async def ack(self) -> None:
        if self._settled:
            raise RuntimeError(f"delivery of turn {self._message.turn_id} is already settled")
        try:
            await self._incoming.ack()
        except _BROKER_ERRORS as exc:
            raise BackendUnavailable(
                f"cannot ack turn {self._message.turn_id}: its channel is gone"
                " (the broker will deliver it again)"
            ) from exc
        self._settled = True

    async def requeue(self, delay: float) -> None:
        if self._settled:
            raise RuntimeError(f"delivery of turn {self._message.turn_id} is already settled")
        if self.stale:
            # The broker already gave it back; a delayed copy would be a duplicate.
            raise BackendUnavailable(
                f"cannot requeue turn {self._message.turn_id}: its channel is gone"
                " (the broker will deliver it again)"
            )
        await self._queue._publish_delayed(self._message, delay)
        await self.ack()


class RabbitTurnQueue:
    def __init__(
        self,
        url: str,
        *,
        name: str = "turnrelay",
        consumer_id: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        publish_timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        self._url = url
        self.topology = Topology(name)
        self.consumer_id = consumer_id or default_consumer_id()
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout

        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractRobustExchange] = {}
        self._connect_lock = asyncio.Lock()
        self._closed = False

        self._consume_channel: AbstractRobustChannel | None = None
        self._turns_queue: AbstractRobustQueue | None = None
        self._consumer_tag: str | None = None
        self._consuming = False
        self._buffer: Handoff[RabbitDelivery] = Handoff()

        self._cancel_lock = asyncio.Lock()
        self._cancel_channel: AbstractRobustChannel | None = None
        self._cancels: asyncio.Queue[str | None] = asyncio.Queue()

    # -- lifecycle -----------------------------------------------------------------

    async def startup(self) -> None:
        self._closed = False
        await self._connect()

    async def shutdown(self) -> None:
        """Close the connection; the broker requeues every unacked delivery."""
        self._closed = True
        self._consuming = False
        self._buffer.close()
        self._cancels.put_nowait(None)
        connection, self._connection = self._connection, None
        self._publish_channel = self._consume_channel = self._cancel_channel = None
        self._exchanges.clear()
        self._turns_queue = None
        self._buffer.take_all()
        if connection is not None:
            try:
                await connection.close()
            except _BROKER_ERRORS:
                log.warning("closing the RabbitMQ connection failed", exc_info=True)

    async def ping(self) -> None:
        connection = await self._connect()
        try:
            async with asyncio.timeout(self._connect_timeout):
                channel = await connection.channel(publisher_confirms=False)
                await channel.close()
        except _BROKER_ERRORS as exc:
            raise BackendUnavailable(f"RabbitMQ does not answer: {exc!r}") from exc

    async def _connect(self) -> AbstractRobustConnection:
        """Connect and declare the topology once; later calls reuse the connection.

        A process that started while the broker was down connects on first use.
        """
        if self._closed:
            raise BackendUnavailable("the RabbitMQ turn queue is shut down")
        async with self._connect_lock:
            if self._connection is not None:
                return self._connection
            connection: AbstractRobustConnection | None = None
            try:
                connection = await aio_pika.connect_robust(
                    self._url,
                    timeout=self._connect_timeout,
                    heartbeat=HEARTBEAT,
                    client_properties={"connection_name": f"turnrelay {self.consumer_id}"},
                )
                async with asyncio.timeout(self._connect_timeout):
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    for spec in self.topology.exchanges:
                        self._exchanges[spec.name] = await self._declare_exchange(channel, spec)
                    turns = await self._declare_queue(channel, self.topology.turns_queue)
                    binding = self.topology.turns_binding
                    await turns.bind(binding.exchange, binding.routing_key)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                if connection is not None:
                    await connection.close()
                raise ConfigError(
                    f"RabbitMQ already has {self.topology.turns_queue.name} (or an exchange of "
                    f"this deployment) declared with other arguments than this version of "
                    f"turnrelay declares ({exc}). Drain and delete it, or set a policy, "
                    "or use another TURNRELAY_NAMESPACE."
                ) from exc
            except _BROKER_ERRORS as exc:
                if connection is not None:
                    await connection.close()
                raise BackendUnavailable(f"RabbitMQ is unreachable: {exc!r}") from exc
            self._publish_channel = channel
            self._connection = connection
            return connection

    @staticmethod
    async def _declare_exchange(
        channel: AbstractRobustChannel, spec: ExchangeSpec
    ) -> AbstractRobustExchange:
        return await channel.declare_exchange(spec.name, spec.type, durable=spec.durable)

    @staticmethod
    async def _declare_queue(
        channel: AbstractRobustChannel, spec: QueueSpec, *, robust: bool = True
    ) -> AbstractRobustQueue:
        return await channel.declare_queue(
            spec.name,
            durable=spec.durable,
            exclusive=spec.exclusive,
            auto_delete=spec.auto_delete,
            arguments=spec.arguments,
            robust=robust,
        )

    # -- publishing ----------------------------------------------------------------

    async def publish(self, message: TurnMessage) -> None:
        exchange = self.topology.turns_exchange.name
        await self._publish(exchange, TURN_ROUTING_KEY, message, what=f"turn {message.turn_id}")

    async def publish_cancel(self, turn_id: str) -> None:
        # A cancel matters only to turns running now, in consumers that are up
        # now: transient, and not mandatory (no executor up is not an error).
        body = json.dumps({"turn_id": turn_id}).encode()
        await self._confirm(
            self.topology.cancel_exchange.name,
            "",
            aio_pika.Message(body, content_type="application/json", message_id=turn_id),
            mandatory=False,
            what=f"cancel of turn {turn_id}",
        )

    async def _publish(
        self, exchange: str, routing_key: str, message: TurnMessage, *, what: str
    ) -> None:
        amqp_message = aio_pika.Message(
            encode(message),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.turn_id,
            headers=dict(message.trace) or None,
        )
        await self._confirm(exchange, routing_key, amqp_message, mandatory=True, what=what)

    async def _confirm(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.Message,
        *,
        mandatory: bool,
        what: str,
    ) -> None:
        await self._connect()
        channel = self._publish_channel
        if channel is None:
            raise PublishFailed(f"{what}: the queue shut down")
        last_error: BaseException | None = None
        try:
            async with asyncio.timeout(self._publish_timeout):
                while True:
                    await channel.ready()
                    target = self._exchanges.get(exchange) or channel.default_exchange
                    try:
                        await target.publish(message, routing_key, mandatory=mandatory)
                        return
                    except _LINK_ERRORS as exc:
                        # The connection or channel dropped under us: wait for the
                        # robust connection to restore it and publish again. The
                        # first copy may have arrived: turns are at-least-once.
                        last_error = exc
                        await asyncio.sleep(RETRY_PAUSE)
        except aio_pika.exceptions.PublishError as exc:
            raise PublishFailed(f"{what} was returned: no queue is bound to take it") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishFailed(f"{what} was rejected by the broker") from exc
        except TimeoutError as exc:
            reason = f" (last error: {last_error!r})" if last_error else ""
            raise PublishFailed(
                f"{what} was not confirmed within {self._publish_timeout:g}s{reason}"
            ) from exc
        except _BROKER_ERRORS as exc:
            raise PublishFailed(f"{what} could not be published: {exc!r}") from exc

    async def _publish_delayed(self, message: TurnMessage, delay: float) -> None:
        spec = self.topology.delay_queue(delay)
        await self._connect()
        channel = self._publish_channel
        if channel is None:
            raise PublishFailed(f"requeue of turn {message.turn_id}: the queue shut down")
        try:
            async with asyncio.timeout(self._publish_timeout):
                # Declared on every requeue: that keeps a busy delay queue from expiring.
                await self._declare_queue(channel, spec, robust=False)
        except _BROKER_ERRORS as exc:
            raise PublishFailed(f"cannot declare {spec.name}: {exc!r}") from exc
        await self._publish("", spec.name, message, what=f"requeue of turn {message.turn_id}")

    # -- consuming turns -----------------------------------------------------------

    async def start_consuming(self, prefetch: int) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        connection = await self._connect()
        await self._subscribe_cancels()
        if self._consuming:
            return
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._consume_channel is None:
                    self._consume_channel = await connection.channel(publisher_confirms=False)
                    self._turns_queue = await self._declare_queue(
                        self._consume_channel, self.topology.turns_queue
                    )
                assert self._turns_queue is not None
                await self._consume_channel.set_qos(prefetch_count=prefetch)
                self._consuming = True
                self._buffer.open()
                self._consumer_tag = await self._turns_queue.consume(
                    self._on_turn, consumer_tag=self.consumer_id
                )
        except _BROKER_ERRORS as exc:
            self._consuming = False
            raise BackendUnavailable(f"cannot consume turns: {exc!r}") from exc

    async def _on_turn(self, incoming: AbstractIncomingMessage) -> None:
        if not self._consuming:
            # Arrived after stop_consuming: give it straight back.
            await incoming.nack(requeue=True)
            return
        try:
            message = decode(incoming.body, incoming.headers)
        except (ValueError, KeyError, TypeError):
            log.error("dropping a malformed turn message: %r", incoming.body[:200])
            await incoming.reject(requeue=False)
            return
        self._buffer.put(RabbitDelivery(self, incoming, message))

    async def receive(
        self,
        timeout: float | None = None,
    ) -> RabbitDelivery | None:
        """The next delivery; ``None`` on timeout, or at once when not consuming."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            delivery = await self._buffer.get(remaining)
            if delivery is None or not delivery.stale:
                return delivery

    async def stop_consuming(self) -> None:
        """Cancel the consumer and give back what was taken but not received."""
        if not self._consuming:
            return
        self._consuming = False
        queue, tag = self._turns_queue, self._consumer_tag
        self._consumer_tag = None
        unreceived = self._buffer.take_all()
        self._buffer.close()
        try:
            if queue is not None and tag is not None:
                await queue.cancel(tag)
            for delivery in unreceived:
                if not delivery.stale:
                    await delivery._incoming.nack(requeue=True)
        except _BROKER_ERRORS as exc:
            # The channel is gone: the broker requeues them by itself.
            log.warning("stop_consuming: %r", exc)

    # -- cancels -------------------------------------------------------------------

    async def cancels(self) -> AsyncIterator[str]:
        await self._subscribe_cancels()
        while True:
            turn_id = await self._cancels.get()
            if turn_id is None:
                return
            yield turn_id

    async def _subscribe_cancels(self) -> None:
        """Bind this consumer's cancel queue; from then on cancels are buffered."""
        connection = await self._connect()
        async with self._cancel_lock:
            if self._cancel_channel is not None:
                return
            try:
                async with asyncio.timeout(self._connect_timeout):
                    channel = await connection.channel(publisher_confirms=False)
                    exchange = await self._declare_exchange(channel, self.topology.cancel_exchange)
                    spec = self.topology.cancel_queue(self.consumer_id)
                    queue = await self._declare_queue(channel, spec)
                    await queue.bind(
                        exchange, self.topology.cancel_binding(self.consumer_id).routing_key
                    )
                    await queue.consume(self._on_cancel, no_ack=True)
            except _BROKER_ERRORS as exc:
                raise BackendUnavailable(f"cannot subscribe to cancels: {exc!r}") from exc
            self._cancel_channel = channel

    async def _on_cancel(self, incoming: AbstractIncomingMessage) -> None:
        try:
            data: Any = json.loads(incoming.body)
            turn_id = str(data["turn_id"])
        except (ValueError, KeyError, TypeError):
            log.error("dropping a malformed cancel message: %r", incoming.body[:200])
            return
        self._cancels.put_nowait(turn_id)
