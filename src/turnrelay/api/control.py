"""Turn control on the API side: submit, cancel, delete.

The API writes the user message and the ``queued`` turn, then publishes the
session's head turn (at most one message per session is in the broker). It
never runs or force-completes a running turn: it asks the executors (a cancel
broadcast, plus a flag in the database for an executor that missed it) and
waits for the terminal frame. A queued turn it can end itself, through the
same terminal compare-and-set the executors use.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from turnrelay.api.hub import StreamClosed, StreamHub
from turnrelay.errors import NotFound, PublishFailed, TurnrelayError, UnknownModel
from turnrelay.events.base import EventLog
from turnrelay.lifecycle import close_stream
from turnrelay.metrics import Metrics
from turnrelay.queue.base import TurnMessage, TurnQueue
from turnrelay.settings import Settings
from turnrelay.store.base import (
    ChatStore,
    Multitask,
    NewTurn,
    SubmitResult,
    TurnOutcome,
    TurnRecord,
    TurnStatus,
)

# How long POST /cancel waits for the executor's terminal frame before 202.
CANCEL_WAIT = 5.0
# How long it waits on the broadcast alone before it also sets the database flag.
FLAG_AFTER = 0.25


@dataclass(frozen=True, slots=True)
class CancelResult:
    cancelled: bool
    turn_id: str | None
    reason: str | None = None


class TurnControl:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ChatStore,
        events: EventLog,
        queue: TurnQueue,
        metrics: Metrics,
        hub: StreamHub,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.store = store
        self.events = events
        self.queue = queue
        self.metrics = metrics
        self._models = settings.allowed_models()

    def resolve_model(self, requested: str | None) -> str:
        if requested is None:
            if not self.settings.model:
                raise UnknownModel("no model given and no default model configured")
            return self.settings.model
        if requested not in self._models:
            raise UnknownModel(
                f"model {requested[:200]!r} is not allowed here; allowed: {', '.join(self._models)}"
            )
        return requested

    async def submit(
        self,
        session_id: str,
        user_id: str,
        text: str,
        *,
        model: str | None,
        message_id: str | None,
        multitask: Multitask,
    ) -> SubmitResult:
        result = await self.store.submit_turn(
            NewTurn(
                session_id=session_id,
                user_id=user_id,
                text=text,
                model=self.resolve_model(model),
                client_message_id=message_id,
                multitask=multitask,
                max_running_per_user=self.settings.max_running_turns_per_user,
                max_queued_per_session=self.settings.max_queued_turns_per_session,
                dispatch_if_idle=True,
            )
        )
        if not result.created:
            return result
        self.metrics.turns_submitted.inc()
        if result.turn.dispatched:  # it is the session's head: hand it over now
            await self._publish(result.turn)
        elif multitask is Multitask.INTERRUPT:
            for turn in result.earlier_active:
                await self._stop(turn)
        return result

    async def publish_head(self, session_id: str) -> None:
        """Publish the session's head turn if none is in flight."""
        head = await self.store.dispatch_next(session_id)
        if head is not None:
            await self._publish(head)

    async def _publish(self, head: TurnRecord) -> None:
        """A failed publish fails the turn (terminal CAS, terminal frames) and
        raises ``PublishFailed``."""
        try:
            await self.queue.publish(TurnMessage(head.id, head.session_id))
        except TurnrelayError as exc:
            outcome = TurnOutcome(TurnStatus.FAILED, error="the turn could not be queued")
            if await self.store.finish_turn(head.id, head.attempt, outcome):
                await close_stream(
                    self.events,
                    await self.store.get_turn(head.id),
                    self.settings.stream_retention,
                )
            raise PublishFailed(f"the turn could not be queued: {exc.detail}") from exc
        # Confirmed: the sweeper leaves this head alone however long it waits in
        # the broker. (Failing here leaves it to the sweeper, which republishes.)
        with contextlib.suppress(TurnrelayError):
            await self.store.mark_published(head.id)

    async def cancel(
        self, session_id: str, user_id: str, turn_id: str | None = None
    ) -> CancelResult:
        """Stop the session's head turn, or with ``turn_id`` that turn (a queued
        one behind the head is ended without ever running)."""
        _, active = await asyncio.gather(
            self.store.get_session(session_id, user_id), self.store.active_turns(session_id)
        )
        if turn_id is not None:
            active = [t for t in active if t.id == turn_id]
            if not active:
                return CancelResult(False, turn_id, "not_active")
        if not active:
            return CancelResult(False, None, "no_active_turn")
        # Stop what runs (or will run next): the session's head turn.
        head = next((t for t in active if t.status is TurnStatus.RUNNING), active[0])
        if await self._stop(head, flag=False):
            return CancelResult(True, head.id)
        # The broadcast is the fast path and usually ends the turn before
        # FLAG_AFTER; only then is the flag written for an executor that missed
        # it, so the common case costs no database write competing with the
        # executor's own terminal write.
        if await self._wait_terminal(head.id, FLAG_AFTER):
            return CancelResult(True, head.id)
        await self.store.request_cancel(head.id)
        if await self._wait_terminal(head.id, CANCEL_WAIT - FLAG_AFTER):
            return CancelResult(True, head.id)
        return CancelResult(False, head.id, "timeout")

    async def _stop(self, turn: TurnRecord, *, flag: bool = True, dispatch: bool = True) -> bool:
        """End ``turn``; True when it is already terminal (a queued turn ended here).
        A running turn gets the cancel broadcast and, with ``flag``, the database flag
        its executor's heartbeat reads should the broadcast have been missed. A
        queued turn ended here lets the session's next one go, unless ``dispatch``
        is off (the session is being deleted)."""
        if turn.status is TurnStatus.QUEUED:
            outcome = TurnOutcome(TurnStatus.CANCELLED, error=None)
            if await self.store.finish_turn(turn.id, 0, outcome):
                await close_stream(
                    self.events,
                    await self.store.get_turn(turn.id),
                    self.settings.stream_retention,
                )
                if dispatch:  # it may have been the dispatched head: let the next one go
                    await self.publish_head(turn.session_id)
                return True
        if flag:
            await asyncio.gather(
                self.store.request_cancel(turn.id), self.queue.publish_cancel(turn.id)
            )
        else:
            await self.queue.publish_cancel(turn.id)
        return False

    async def _wait_terminal(self, turn_id: str, timeout: float) -> bool:
        """Wait until the turn's terminal frame is logged."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        after = 0
        with contextlib.suppress(NotFound):
            info = await self.events.info(turn_id)
            if info.terminal:
                return True
            after = info.last_seq
        # Through the hub: a burst of cancels shares its one blocking read.
        async with self.hub.subscribe(turn_id, after) as sub:
            while (left := deadline - loop.time()) > 0:
                try:
                    frame = await sub.next(left)
                except (StreamClosed, TurnrelayError):
                    return False
                if frame is not None and frame.terminal:
                    return True
        return False

    async def delete(self, session_id: str, user_id: str) -> None:
        await self.store.get_session(session_id, user_id)
        active = await self.store.active_turns(session_id)
        # Queued turns first, and without dispatching the next one: nothing of a
        # session being deleted may start running now.
        active.sort(key=lambda t: t.status is TurnStatus.RUNNING)
        running = [t for t in active if not await self._stop(t, dispatch=False)]
        for turn in running:
            await self._wait_terminal(turn.id, CANCEL_WAIT)
        for turn_id in {m.turn_id for m in await self.store.messages(session_id)}:
            with contextlib.suppress(TurnrelayError):
                await self.events.delete(turn_id)
        await self.store.delete_session(session_id, user_id)
