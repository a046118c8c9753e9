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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from turnrelay import tracing
from turnrelay.api.hub import StreamClosed, StreamHub
from turnrelay.errors import NotFound, PublishFailed, TurnrelayError, UnknownModel, Unprocessable
from turnrelay.events.base import EventLog
from turnrelay.lifecycle import admit_heads, close_stream
from turnrelay.metrics import Metrics
from turnrelay.queue.base import TurnMessage, TurnQueue
from turnrelay.settings import Settings
from turnrelay.storage.base import ObjectStore
from turnrelay.store.base import (
    ApprovalAnswer,
    ChatStore,
    Decision,
    Multitask,
    NewTurn,
    SubmitResult,
    TurnOutcome,
    TurnRecord,
    TurnStatus,
)
from turnrelay.transcript.store import delete_session_transcripts
from turnrelay.webhooks import check_target

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
        objects: ObjectStore,
    ) -> None:
        self.settings = settings
        self.objects = objects
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
        webhook_url: str | None = None,
        regenerate: bool = False,
        replaces: str | None = None,
    ) -> SubmitResult:
        with tracing.span(
            "turn.submit", kind="SERVER", session_id=session_id, user_id=user_id
        ) as current:
            new = NewTurn(
                session_id=session_id,
                user_id=user_id,
                text=text,
                model=self.resolve_model(model),
                client_message_id=message_id,
                multitask=multitask,
                max_running_per_user=self.settings.max_running_turns_per_user,
                max_waiting_per_user=self.settings.max_waiting_turns_per_user,
                max_queued_per_session=self.settings.max_queued_turns_per_session,
                dispatch_if_idle=True,
                webhook_url=await self.webhook_target(webhook_url),
                regenerate=regenerate,
                replaces_message_id=replaces,
            )
            result = await self._submit(new)
            if current is not None:
                current.set_attribute("turn.id", result.turn.id)
            return result

    async def _submit(self, new: NewTurn) -> SubmitResult:
        session_id, multitask = new.session_id, new.multitask
        result = await self.store.submit_turn(new)
        if not result.created:
            return result
        self.metrics.turns_submitted.inc()
        if result.turn.dispatched:  # it is the session's head: hand it over now
            await self._publish(result.turn)
        elif not result.earlier_active:
            # A head waiting in the user's FIFO: a slot may have freed since the
            # turns ahead of it were queued; admit the oldest if so.
            await self.publish_head(session_id)
        elif multitask is Multitask.INTERRUPT:
            for turn in result.earlier_active:
                await self._stop(turn)
        return result

    async def webhook_target(self, url: str | None) -> str | None:
        """The turn's webhook: the body's, else the default; checked now (and
        again before every send)."""
        url = url or self.settings.webhook_url
        if url is None:
            return None
        if not self.settings.webhook_secret:
            raise Unprocessable(
                "webhooks are off: the server has no TURNRELAY_WEBHOOK_SECRET to sign them",
                code="webhooks_disabled",
            )
        await check_target(url, allow_private=self.settings.webhook_allow_private)
        return url

    async def publish_head(self, session_id: str) -> None:
        """Publish the session's head turn if none is in flight, and every head
        of its owner's FIFO that a free running slot admits."""
        await admit_heads(
            self.store,
            session_id,
            self._publish,
            max_running_per_user=self.settings.max_running_turns_per_user,
        )

    async def _publish(self, head: TurnRecord) -> None:
        """A failed publish fails the turn (terminal CAS, terminal frames) and
        raises ``PublishFailed``."""
        try:
            with tracing.span("turn.publish", kind="PRODUCER", turn_id=head.id):
                await self.queue.publish(
                    TurnMessage(head.id, head.session_id, trace=tracing.inject())
                )
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
        if turn.waiting and await self._end_waiting(turn, dispatch=dispatch):
            return True
        if flag:
            await asyncio.gather(
                self.store.request_cancel(turn.id), self.queue.publish_cancel(turn.id)
            )
        else:
            await self.queue.publish_cancel(turn.id)
        return False

    async def _end_waiting(self, turn: TurnRecord, *, dispatch: bool) -> bool:
        """Cancel a turn that waits for approvals: no executor runs it, so the
        API ends it itself (the same CAS on its attempt; an executor that
        continues it first wins, and gets the broadcast instead)."""
        assert turn.paused is not None
        parts = [_cancelled_request(p) for p in turn.paused.parts]
        outcome = TurnOutcome(TurnStatus.CANCELLED, content=turn.paused.content, parts=parts)
        if not await self.store.finish_turn(turn.id, turn.attempt, outcome):
            return False
        await close_stream(
            self.events, await self.store.get_turn(turn.id), self.settings.stream_retention
        )
        if dispatch:
            await self.publish_head(turn.session_id)
        return True

    async def answer_approvals(
        self, session_id: str, turn_id: str, decisions: Sequence[Decision]
    ) -> ApprovalAnswer:
        """Record the user's answers; the one that decides a pause's last request
        hands the turn to an executor to go on. If that publish fails, the
        answers stand and the sweeper publishes it."""
        answer = await self.store.answer_approvals(turn_id, decisions)
        if answer.resume:
            await self.queue.publish(TurnMessage(turn_id, session_id, trace=tracing.inject()))
        return answer

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
        # Transcripts before the row: a failure here leaves the session to delete
        # again, never transcripts that nothing points at.
        await delete_session_transcripts(self.objects, user_id, session_id)
        await self.store.delete_session(session_id, user_id)
        # Its running turn's slot is free now, and the executor that ran it may
        # have found the session gone when it looked for the next turn to admit.
        waiting = await self.store.oldest_waiting(user_id)
        if waiting is not None:
            await self.publish_head(waiting.session_id)


def _cancelled_request(part: dict[str, Any]) -> dict[str, Any]:
    """A tool part still waiting for its answer, as the cancel leaves it: denied."""
    if part.get("state") != "approval-requested":
        return part
    approval = {**part.get("approval", {}), "approved": False, "reason": "cancelled"}
    return {**part, "state": "output-denied", "approval": approval}
