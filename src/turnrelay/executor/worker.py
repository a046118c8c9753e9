"""The executor loop: ``num_workers`` workers, a cancel listener, the liveness
beat, a reaper and a sweeper.

Each worker takes one delivery at a time, so the broker's prefetch equals the
worker count and no delivery waits inside the process while another executor
is idle. ``run(until_idle=True)`` returns once the queue is empty and no turn
runs, which makes end-to-end tests deterministic without sleeps.

Liveness. Every ``LIVENESS_TTL / 6`` the executor beats (``Lease.beat``) with
the turns it holds leases for. Its session leases are only as good as that
beat: once it lapses (the process died, or froze: SIGSTOP, a long GC pause, a
VM migration), another executor's delivery takes the lease over. A killed
executor's deliveries come back from the broker at once; a frozen one's do
not (its connection looks alive), so every executor's reaper, every
``LIVENESS_TTL / 3``, claims the holdings of lapsed executors (each exactly
once, cluster-wide) and runs those turns itself: it hands each to its own
workers as a local delivery rather than through the broker, which would push
it into the frozen consumer's open prefetch as readily as anywhere else. A
local delivery's ack is a no-op (the frozen process's own delivery is settled
when it wakes, or comes back when the broker drops its connection, and is then
dropped as ended); its requeue publishes the turn to the broker.

The sweeper (one executor per ``SWEEP_INTERVAL``, under a lease) publishes the
session heads no message carries: a head nobody dispatched (a crash between a
finish and the next dispatch), a dispatched head whose publish the broker never
confirmed, and a running turn whose holder is gone without a reaper having
seen it (Redis lost the liveness keys). A head waiting in the broker behind a
backlog has a confirmed publish and is left alone.

Stopping (``stop()``, SIGTERM): stop taking deliveries, let running turns
finish for ``grace`` seconds, then abandon the rest without acking them; the
broker hands those to another executor, which starts the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime, timedelta

from turnrelay.errors import TurnrelayError
from turnrelay.events.base import EventLog
from turnrelay.executor.registry import RunningTurns, StopReason
from turnrelay.executor.registry import holding as held_as
from turnrelay.executor.runner import REPUBLISH_AFTER, TurnRunner
from turnrelay.lease.base import Lease
from turnrelay.lifecycle import admit_heads, session_lease_key
from turnrelay.metrics import Metrics
from turnrelay.queue.base import Delivery, TurnMessage, TurnQueue
from turnrelay.runtime.base import AgentRuntime
from turnrelay.settings import Settings
from turnrelay.store.base import ExecutorStore, TurnRecord
from turnrelay.webhooks import WebhookSender

log = logging.getLogger(__name__)


class TakeoverDelivery:
    """A turn reaped from an executor that stopped beating, run here directly."""

    def __init__(self, queue: TurnQueue, message: TurnMessage) -> None:
        self._queue = queue
        self._message = message

    @property
    def message(self) -> TurnMessage:
        return self._message

    @property
    def redelivered(self) -> bool:
        return True

    async def ack(self) -> None:
        pass  # no broker message of its own

    async def requeue(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._queue.publish(self._message)


# How long an idle worker waits on the queue before checking for shutdown/idle.
_POLL = 0.2
# The sweeper's lease: one executor sweeps per interval.
SWEEP_LEASE = "sweeper"


class Executor:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ExecutorStore,
        events: EventLog,
        lease: Lease,
        queue: TurnQueue,
        runtimes: dict[str, AgentRuntime],
        metrics: Metrics,
        grace: float,
        executor_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.lease = lease
        self.queue = queue
        self.metrics = metrics
        self.grace = grace
        self.id = executor_id or f"executor-{uuid.uuid4().hex[:12]}"
        self.running = RunningTurns()
        self.runner = TurnRunner(
            settings=settings,
            store=store,
            events=events,
            lease=lease,
            queue=queue,
            runtimes=runtimes,
            owner=self.id,
            running=self.running,
            metrics=metrics,
        )
        self.webhooks: WebhookSender | None = None
        if settings.webhook_secret:
            self.webhooks = WebhookSender(
                store,
                secret=settings.webhook_secret,
                allow_private=settings.webhook_allow_private,
                retry_base=settings.webhook_retry_base,
                max_attempts=settings.webhook_max_attempts,
            )
        self._stopping = asyncio.Event()
        self._busy = 0
        self._takeovers: asyncio.Queue[TakeoverDelivery] = asyncio.Queue()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, until_idle: bool = False) -> None:
        # Alive before taking any lease: an owner that never beat counts as dead.
        await self._beat()
        await self.queue.start_consuming(self.settings.num_workers)
        await self.sweep(startup=True)
        helpers = [
            asyncio.create_task(self._beat_loop(), name="liveness"),
            asyncio.create_task(self._reap_loop(), name="reaper"),
            asyncio.create_task(self._listen_cancels(), name="cancel-listener"),
            asyncio.create_task(self._sweep_loop(), name="sweeper"),
        ]
        if self.webhooks is not None:
            helpers.append(asyncio.create_task(self.webhooks.run(), name="webhooks"))
        workers = [
            asyncio.create_task(self._work(until_idle), name=f"worker-{i}")
            for i in range(self.settings.num_workers)
        ]
        try:
            stop_wait = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait([stop_wait, *workers], return_when=asyncio.FIRST_COMPLETED)
            if until_idle and stop_wait not in done:
                await asyncio.gather(*workers)
            stop_wait.cancel()
            await self._drain(workers)
        finally:
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # What is still held now was abandoned unacked: the broker gives it
            # back when this process's connection closes, not the reaper.
            with contextlib.suppress(TurnrelayError):
                await self.lease.leave(self.id)

    async def _drain(self, workers: list[asyncio.Task[None]]) -> None:
        self._stopping.set()
        with contextlib.suppress(TurnrelayError):
            await self.queue.stop_consuming()
        pending = [w for w in workers if not w.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.grace)
            if still:
                log.warning(
                    "abandoning %d running turn(s) after %.0f s grace",
                    len(self.running),
                    self.grace,
                )
                self.running.stop_all(StopReason.SHUTDOWN)
                await asyncio.wait(still, timeout=5)
                for task in still:
                    task.cancel()
        for task in workers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("worker failed", exc_info=task.exception())

    async def _work(self, until_idle: bool) -> None:
        while not self._stopping.is_set():
            delivery: Delivery | None
            try:
                if not self._takeovers.empty():
                    delivery = self._takeovers.get_nowait()
                else:
                    delivery = await self.queue.receive(timeout=_POLL)
            except TurnrelayError as exc:
                log.warning("receive failed: %s", exc.detail)
                await asyncio.sleep(1.0)
                continue
            if delivery is None:
                if until_idle and self._busy == 0:
                    return
                continue
            self._busy += 1
            try:
                await self.runner.handle(delivery)
            except TurnrelayError as exc:
                log.error("turn %s: %s", delivery.message.turn_id, exc.detail)
            except Exception:
                log.exception("turn %s: unexpected error", delivery.message.turn_id)
            finally:
                self._busy -= 1

    async def _listen_cancels(self) -> None:
        while True:
            try:
                async for turn_id in self.queue.cancels():
                    self.running.cancel(turn_id)
            except TurnrelayError as exc:
                log.warning("cancel listener: %s", exc.detail)
                await asyncio.sleep(1.0)

    async def _beat(self) -> None:
        holding = [
            held_as(turn_id, session_id) for turn_id, session_id in self.running.held.items()
        ]
        await self.lease.beat(self.id, self.settings.liveness_ttl, holding)

    async def _beat_loop(self) -> None:
        changed = self.running.held_changed
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self.settings.liveness_ttl / 6)
            changed.clear()
            try:
                await self._beat()
            except TurnrelayError as exc:
                log.warning("liveness beat failed: %s", exc.detail)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.liveness_ttl / 3)
            try:
                await self.reap()
            except TurnrelayError as exc:
                log.warning("reaping failed: %s", exc.detail)

    async def reap(self) -> int:
        """Take over the turns of executors whose liveness lapsed: run them here
        if a worker is free, else publish them to the broker."""
        reaped = await self.lease.reap()
        for item in reaped:
            turn_id, _, session_id = item.partition(" ")
            message = TurnMessage(turn_id, session_id)
            log.warning("turn %s: its executor stopped beating; taking it over", turn_id)
            self.metrics.takeovers.labels("reaper").inc()
            if self._busy + self._takeovers.qsize() < self.settings.num_workers:
                self._takeovers.put_nowait(TakeoverDelivery(self.queue, message))
            else:
                await self.queue.publish(message)
        return len(reaped)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                # Not released: the lease lapses by itself before the next round.
                ttl = self.settings.sweep_interval * 0.9
                if await self.lease.acquire(SWEEP_LEASE, self.id, ttl):
                    await self.sweep()
            except TurnrelayError as exc:
                log.warning("sweep failed: %s", exc.detail)

    async def sweep(self, *, startup: bool = False) -> int:
        """Publish the session heads that no message carries (module docstring)."""
        published = 0
        # Approval requests nobody answered in time count as denied; a turn
        # whose last request that was goes on, on whichever executor gets it.
        reason = f"no answer within {self.settings.approval_timeout:g} s"
        for turn in await self.store.expire_approvals(datetime.now(UTC), reason):
            await self.queue.publish(TurnMessage(turn.id, turn.session_id))
            published += 1
        for head in await self.store.undispatched_heads():
            published += await self._publish_head(head.session_id)
        cutoff = datetime.now(UTC) - timedelta(seconds=REPUBLISH_AFTER)
        for turn in await self.store.unpublished_heads(cutoff):
            published += await self._publish_head(turn.session_id, republish_before=cutoff)
        if self.settings.broker_url.startswith("memory:"):
            if startup:
                # The in-process broker lost every message with the last process.
                for turn in await self.store.dispatched_active():
                    await self.queue.publish(TurnMessage(turn.id, turn.session_id))
                    published += 1
            return published
        held_since = datetime.now(UTC) - timedelta(seconds=self.settings.lease_ttl)
        # A lease can lapse under a live executor that was slow to refresh it
        # (an overloaded event loop, a slow start): that executor still runs
        # the turn, and a republish would start a second attempt fencing out a
        # healthy one. What live executors hold is theirs; the reaper takes
        # what dead ones held.
        held = await self.lease.live_holdings()
        for turn in await self.store.dispatched_active(running_only=True):
            if turn.waiting or (turn.started_at or turn.created_at) > held_since:
                continue  # (a turn waiting for approvals holds no lease)
            if held_as(turn.id, turn.session_id) in held:
                continue
            if await self.lease.holder(session_lease_key(turn.session_id)) is None:
                await self.queue.publish(TurnMessage(turn.id, turn.session_id))
                published += 1
        return published

    async def _publish_head(
        self, session_id: str, *, republish_before: datetime | None = None
    ) -> int:
        async def publish(head: TurnRecord) -> None:
            await self.queue.publish(TurnMessage(head.id, head.session_id))
            await self.store.mark_published(head.id)
            self.metrics.takeovers.labels("sweeper").inc()

        return await admit_heads(
            self.store,
            session_id,
            publish,
            max_running_per_user=self.settings.max_running_turns_per_user,
            republish_before=republish_before,
        )
