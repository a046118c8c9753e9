"""The RabbitMQ topology of one turnrelay deployment, as data.

Everything is named after the deployment's ``name`` (``turnrelay`` by default;
tests use a unique one), so several deployments can share a vhost:

    {name}.turns              durable direct exchange
      └─ "turn" ─▶ {name}.turns      durable quorum queue: the turns
    {name}.cancel             durable fanout exchange
      └─▶ {name}.cancel.{consumer_id}   one per consumer: exclusive, auto-delete
    (default exchange) ─▶ {name}.turns.delay.{ms}ms
          durable classic queue, no consumers: every message waits ``ms``
          (queue-level TTL), then is dead-lettered to {name}.turns / "turn"

Why the delay queues look like this: a requeued turn must not hold a prefetch
slot while it waits, so it leaves the consumer at once (published here, then the
original is acked). RabbitMQ expires messages only at the head of a queue, so
one delay queue with per-message TTLs would hold a short delay behind a long
one; one queue per delay (rounded up to ``DELAY_GRANULARITY``) keeps every queue
first-in first-out with one TTL. Each delay queue deletes itself
(``x-expires``) once unused for its TTL plus ``DELAY_QUEUE_GRACE``; it is
re-declared on every requeue, which counts as use.

The turns queue is a quorum queue: replicated, and it survives a broker restart
with its messages (which are persistent). Its delivery limit is set explicitly
(``DELIVERY_LIMIT``), far above anything the lifecycle produces: the executor
counts attempts in the database and gives up after its own maximum, and its
requeues are republished copies that the broker does not count. Left unset,
RabbitMQ 4 applies 20, which a session held through many executor restarts
could reach and then silently drop; ``-1`` means "no limit" only from RabbitMQ
4 on, while 3.x drops the message at its first redelivery (measured on 3.10).
The cancel queues are named by their consumer (not server-named) so that the
robust connection can re-declare the same queue after a reconnect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

TURN_ROUTING_KEY = "turn"
# Delays are rounded up to this grain so a jittered delay does not make a queue
# per millisecond.
DELAY_GRANULARITY = 0.1
# Redeliveries (a consumer's channel closing with the message unacked) after
# which the broker drops a turn message; see the module docstring.
DELIVERY_LIMIT = 1_000_000
# How long an unused delay queue outlives its TTL before it deletes itself: long
# enough for the last message published into it to expire and move on.
DELAY_QUEUE_GRACE = 60.0


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: str
    durable: bool = True


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BindingSpec:
    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class Topology:
    name: str

    @property
    def turns_exchange(self) -> ExchangeSpec:
        return ExchangeSpec(f"{self.name}.turns", "direct")

    @property
    def turns_queue(self) -> QueueSpec:
        return QueueSpec(
            f"{self.name}.turns",
            arguments={"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT},
        )

    @property
    def turns_binding(self) -> BindingSpec:
        return BindingSpec(self.turns_queue.name, self.turns_exchange.name, TURN_ROUTING_KEY)

    @property
    def cancel_exchange(self) -> ExchangeSpec:
        return ExchangeSpec(f"{self.name}.cancel", "fanout")

    def cancel_queue(self, consumer_id: str) -> QueueSpec:
        return QueueSpec(
            f"{self.name}.cancel.{consumer_id}", durable=False, exclusive=True, auto_delete=True
        )

    def cancel_binding(self, consumer_id: str) -> BindingSpec:
        return BindingSpec(self.cancel_queue(consumer_id).name, self.cancel_exchange.name, "")

    def delay_queue(self, delay: float) -> QueueSpec:
        ttl_ms = delay_ms(delay)
        return QueueSpec(
            f"{self.name}.turns.delay.{ttl_ms}ms",
            arguments={
                "x-queue-type": "classic",
                "x-message-ttl": ttl_ms,
                "x-dead-letter-exchange": self.turns_exchange.name,
                "x-dead-letter-routing-key": TURN_ROUTING_KEY,
                "x-expires": ttl_ms + int(DELAY_QUEUE_GRACE * 1000),
            },
        )

    @property
    def exchanges(self) -> tuple[ExchangeSpec, ...]:
        return (self.turns_exchange, self.cancel_exchange)


def delay_ms(delay: float) -> int:
    """``delay`` seconds rounded up to ``DELAY_GRANULARITY``, in milliseconds."""
    steps = math.ceil(max(delay, 0.0) / DELAY_GRANULARITY - 1e-9)
    return round(steps * DELAY_GRANULARITY * 1000)
