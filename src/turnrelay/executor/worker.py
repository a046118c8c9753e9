"""The executor loop: ``num_workers`` workers, a cancel listener, a sweeper.

Each worker takes one delivery at a time, so the broker's prefetch equals the
worker count and no delivery waits inside the process while another executor
is idle. ``run(until_idle=True)`` returns once the queue is empty and no turn
runs, which makes end-to-end tests deterministic without sleeps.

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
from turnrelay.executor.runner import TurnRunner
from turnrelay.lease.base import Lease
from turnrelay.lifecycle import session_lease_key
from turnrelay.metrics import Metrics
from turnrelay.queue.base import TurnMessage, TurnQueue
from turnrelay.runtime.base import AgentRuntime
from turnrelay.settings import Settings
from turnrelay.store.base import ChatStore

log = logging.getLogger(__name__)

# How long an idle worker waits on the queue before checking for shutdown/idle.
_POLL = 0.2


class Executor:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ChatStore,
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
        self._stopping = asyncio.Event()
        self._busy = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, until_idle: bool = False) -> None:
        await self.queue.start_consuming(self.settings.num_workers)
        await self.sweep(orphan_age=None)
        helpers = [
            asyncio.create_task(self._listen_cancels(), name="cancel-listener"),
            asyncio.create_task(self._sweep_loop(), name="sweeper"),
        ]
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
            try:
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

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep(orphan_age=max(4 * self.settings.lease_ttl, 60.0))
            except TurnrelayError as exc:
                log.warning("sweep failed: %s", exc.detail)

    async def sweep(self, *, orphan_age: float | None) -> int:
        """Publish session heads that no message carries.

        A turn is published when it becomes its session's head; a crash between
        a finish and that publish leaves the next turn waiting, and this finds it.
        With ``orphan_age`` it also re-publishes dispatched turns with no lease
        held for that long (their message was lost with an in-memory broker);
        a duplicate is harmless, the redelivery rules drop or requeue it.
        """
        published = 0
        for head in await self.store.undispatched_heads():
            turn = await self.store.dispatch_next(head.session_id)
            if turn is not None:
                await self.queue.publish(TurnMessage(turn.id, turn.session_id))
                published += 1
        if orphan_age is None and not self.settings.broker_url.startswith("memory:"):
            return published
        cutoff = datetime.now(UTC) - timedelta(seconds=orphan_age or 0)
        for turn in await self.store.dispatched_active():
            since = turn.started_at or turn.created_at
            if since > cutoff:
                continue
            if await self.lease.holder(session_lease_key(turn.session_id)) is None:
                await self.queue.publish(TurnMessage(turn.id, turn.session_id))
                published += 1
        return published
