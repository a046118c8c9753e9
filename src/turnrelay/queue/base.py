"""The TurnQueue port.

A turn message names a turn; everything else the executor reads from the
database. Delivery is at-least-once: a message that is not acked is delivered
again (to any consumer) when its consumer goes away, so the executor acks only
after the turn's terminal frames and state are persisted (``turnrelay.executor``
owns that policy). ``requeue`` hands a message back to be delivered again after
a delay (a session whose lease is held elsewhere).

Cancels are a broadcast: ``publish_cancel`` reaches every subscriber, and each
executor subscribes with its own queue (RabbitMQ: an exclusive, auto-delete queue
bound to a fanout exchange).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class TurnMessage:
    turn_id: str
    session_id: str
    # The publisher's trace context (W3C ``traceparent``/``tracestate``), carried
    # as message headers; empty when tracing is off.
    trace: Mapping[str, str] = field(default_factory=dict, compare=False)


class Delivery(Protocol):
    @property
    def message(self) -> TurnMessage: ...

    @property
    def redelivered(self) -> bool: ...

    async def ack(self) -> None: ...

    async def requeue(self, delay: float) -> None:
        """Give the message back; it is delivered again after ``delay`` seconds."""
        ...


class TurnQueue(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None:
        """Stop consuming; unacked deliveries go back to the queue."""
        ...

    async def publish(self, message: TurnMessage) -> None:
        """Durably enqueue. Raises ``PublishFailed`` when the broker did not confirm."""
        ...

    async def start_consuming(self, prefetch: int) -> None:
        """Begin taking deliveries; at most ``prefetch`` are outstanding (unacked)."""
        ...

    async def receive(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery; ``None`` when ``timeout`` passes with none."""
        ...

    async def stop_consuming(self) -> None:
        """Stop taking new deliveries (graceful shutdown); held ones may still be acked."""
        ...

    async def publish_cancel(self, turn_id: str) -> None: ...

    def cancels(self) -> AsyncIterator[str]:
        """Turn ids whose cancel was requested, as they arrive (this subscriber's queue)."""
        ...

    async def ping(self) -> None: ...
