"""TurnRunner: the lifecycle of one delivered turn message.

    delivered ─▶ terminal already? ──yes──▶ repair its stream, ack, drop
        │ no
        ▼
    session lease ──held elsewhere──▶ requeue with a delay
        │ acquired
        ▼
    attempt n+1 (CAS) ── n reached max_attempts ──▶ failed
        │
        ▼
    claim the log with epoch = attempt ─▶ run the runtime, heartbeat refreshing
        │                                 lease + stream TTL, restoring a lost log
        ▼
    terminal CAS ──won──▶ terminal frames ─▶ release lease ─▶ dispatch next ─▶ ack

The lease is taken over when its holder's liveness lapsed (a dead or frozen
executor), so a delivery of a turn whose executor froze starts the next
attempt instead of waiting out the lease. The new attempt claims the turn's
log with its attempt number before reading where the log ends: from then on
the frozen executor's appends are refused, whoever writes first.

The ack comes last, after the terminal state and frames are persisted: if this
process dies anywhere before it, the broker redelivers and the rules above make
the redelivery safe. Every delivery is settled: a backend that is down, or any
unexpected error, requeues it (a second look is safe); a ``StaleWriter`` (a
newer attempt owns the turn, and holds its own delivery) acks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from turnrelay import logs, tracing
from turnrelay.errors import (
    BackendUnavailable,
    RuntimeFailure,
    StaleWriter,
    TurnNotFound,
    TurnrelayError,
)
from turnrelay.events import chunks
from turnrelay.events.base import EventLog
from turnrelay.executor.assembler import Assembler, persisted_parts
from turnrelay.executor.frames import FrameWriter
from turnrelay.executor.registry import Run, RunningTurns, StopReason
from turnrelay.lease.base import Lease
from turnrelay.lifecycle import (
    SEQ_EPOCH,
    admit_heads,
    close_stream,
    session_lease_key,
    terminal_chunks,
)
from turnrelay.metrics import Metrics
from turnrelay.queue.base import Delivery, TurnMessage, TurnQueue
from turnrelay.runtime.base import AgentRuntime, ApprovalRequest, Pause, Resume, TurnContext
from turnrelay.settings import ModelRef, Settings
from turnrelay.store.base import (
    ExecutorStore,
    MessageRecord,
    NewApproval,
    TurnOutcome,
    TurnPause,
    TurnRecord,
    TurnStatus,
)

log = logging.getLogger(__name__)

# How long a dispatched head may go without its publish confirmed before a
# finishing executor or the sweeper publishes it again: its publisher
# (an API or an executor) died between the dispatch and the broker's confirm.
REPUBLISH_AFTER = 15.0
# How long the terminal CAS is retried while the database is unreachable (a
# failover, a restart): the turn's work is done, only its outcome must land.
FINISH_BUDGET = 30.0
# How long an attempt waits for its cancelled heartbeat to end before it goes
# on to write its end without it.
HEARTBEAT_STOP_WAIT = 2.0


@dataclass(frozen=True, slots=True)
class _Earlier:
    """What a turn is told of its session's earlier turns, and of its own pause."""

    history: list[MessageRecord]
    cli_session: str | None  # the CLI session a ``claude`` turn resumes
    resume: Resume | None = None  # the pause this attempt continues from


@dataclass(slots=True)
class _Paused:
    """The runtime stopped for approvals: its state and what it asked."""

    state: dict[str, Any]
    requests: list[NewApproval]


class _Outcome(Enum):
    DONE = "done"  # terminal (now or before): dispatch the next turn, ack
    RETRY = "retry"  # the turn changed under us: look again after a delay
    ABANDONED = "abandoned"  # stopped for shutdown: leave the message unacked


class TurnRunner:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ExecutorStore,
        events: EventLog,
        lease: Lease,
        queue: TurnQueue,
        runtimes: Mapping[str, AgentRuntime],
        owner: str,
        running: RunningTurns,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.lease = lease
        self.queue = queue
        self.runtimes = runtimes
        self.owner = owner
        self.running = running
        self.metrics = metrics

    async def handle(self, delivery: Delivery) -> None:
        message = delivery.message
        with (
            logs.about_turn(message.turn_id, message.session_id),
            tracing.span(
                "turn.deliver",
                parent=message.trace,
                kind="CONSUMER",
                turn_id=message.turn_id,
                session_id=message.session_id,
                redelivered=delivery.redelivered,
            ),
        ):
            await self._handle_logged(message, delivery)

    async def _handle_logged(self, message: TurnMessage, delivery: Delivery) -> None:
        try:
            await self._handle(message, delivery)
            return
        except StaleWriter as exc:
            # A newer attempt claimed the turn's log: it runs the turn, under a
            # delivery of its own. This one is done.
            log.info("turn %s: %s; leaving it to the newer attempt", message.turn_id, exc.detail)
            self.metrics.delivery("superseded")
            with contextlib.suppress(TurnrelayError, RuntimeError):
                await delivery.ack()
            return
        except BackendUnavailable as exc:
            log.warning("turn %s: %s; requeueing", message.turn_id, exc.detail)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("turn %s: unexpected error; requeueing", message.turn_id)
        # Give the message back rather than lose it or hold it: the redelivery
        # rules make a second look safe.
        self.metrics.delivery("requeued")
        with contextlib.suppress(TurnrelayError, RuntimeError):
            await delivery.requeue(self.settings.requeue_delay)

    async def _handle(self, message: TurnMessage, delivery: Delivery) -> None:
        try:
            turn = await self.store.get_turn(message.turn_id)
        except TurnNotFound:
            await delivery.ack()  # its session was deleted
            self.metrics.delivery("deleted")
            return
        if not turn.status.active:
            # Delivered again after it ended: make sure its stream is closed
            # (its owner may have died between the CAS and the frames), then drop.
            await close_stream(self.events, turn, self.settings.stream_retention)
            await self._dispatch_next(turn.session_id)
            await delivery.ack()
            self.metrics.delivery("ended")
            return
        if turn.waiting:
            # Paused for tool approvals: nothing runs until they are answered,
            # and the answer that decides the last one publishes it again.
            await delivery.ack()
            self.metrics.delivery("waiting")
            return
        key = session_lease_key(turn.session_id)
        # Held from before the lease is taken, so a freeze anywhere from here on
        # is visible to the other executors' reaper.
        self.running.hold(turn.id, turn.session_id)
        try:
            if not await self.lease.acquire(key, self.owner, self.settings.lease_ttl):
                await delivery.requeue(self.settings.requeue_delay)
                self.metrics.delivery("requeued")
                return
            try:
                outcome = await self._run_leased(turn, key)
            finally:
                with contextlib.suppress(TurnrelayError):
                    await self.lease.release(key, self.owner)
        finally:
            self.running.unhold(turn.id)
        if outcome is _Outcome.RETRY:
            await delivery.requeue(self.settings.requeue_delay)
            self.metrics.delivery("requeued")
            return
        if outcome is _Outcome.ABANDONED:
            self.metrics.delivery("abandoned")
            return  # not acked: the broker hands it to another executor
        await self._dispatch_next(turn.session_id)
        await delivery.ack()
        self.metrics.delivery("done")

    async def _dispatch_next(self, session_id: str) -> None:
        await admit_heads(
            self.store,
            session_id,
            self._publish,
            max_running_per_user=self.settings.max_running_turns_per_user,
            republish_before=datetime.now(UTC) - timedelta(seconds=REPUBLISH_AFTER),
        )

    async def _publish(self, head: TurnRecord) -> None:
        await self.queue.publish(TurnMessage(head.id, head.session_id))
        await self.store.mark_published(head.id)

    async def _run_leased(self, turn: TurnRecord, key: str) -> _Outcome:
        # Attempts count from the turn's last pause: a pause ends its attempt
        # cleanly, and the answered turn starts afresh from it.
        since = turn.attempt - (turn.paused.attempt if turn.paused is not None else 0)
        if (
            turn.status is TurnStatus.RUNNING
            and not turn.resumable
            and since >= self.settings.max_attempts
        ):
            outcome = TurnOutcome(
                TurnStatus.FAILED,
                error=f"the turn was interrupted {turn.attempt} times; giving up",
            )
            if await self.store.finish_turn(turn.id, turn.attempt, outcome):
                done = await self.store.get_turn(turn.id)
                await close_stream(self.events, done, self.settings.stream_retention)
                self.metrics.turn_finished(done.status.value, None)
            return _Outcome.DONE
        # The CAS on the attempt we read catches any change since that read.
        # The history (earlier turns only) and the CLI's session id do not depend
        # on the CAS: read them at once.
        started, history, cli_session = await asyncio.gather(
            self.store.start_turn(turn.id, turn.attempt),
            self.store.history(turn.session_id, turn.seq),
            # Only a runtime that resumes the CLI's session needs its id: the
            # others' turns skip that read.
            self._cli_session(turn),
        )
        resume = None
        if started is not None and started.paused is not None:
            answers = {
                a.id: (a.approved, a.reason)
                for a in await self.store.approvals(turn.id)
                if a.approved is not None and a.id in started.paused.approval_ids
            }
            resume = Resume(started.paused.state, answers)
        if started is None:
            current = await self.store.get_turn(turn.id)
            if current.status.active:
                return _Outcome.RETRY
            await close_stream(self.events, current, self.settings.stream_retention)
            return _Outcome.DONE
        with logs.about_turn(started.id, started.session_id, started.attempt):
            abandoned = await self._attempt(started, key, _Earlier(history, cli_session, resume))
        return _Outcome.ABANDONED if abandoned else _Outcome.DONE

    async def _cli_session(self, turn: TurnRecord) -> str | None:
        """The session's CLI session id, for a runtime that resumes it (``claude``)."""
        runtime = self.runtimes.get(ModelRef.parse(turn.model).provider)
        if not getattr(runtime, "resumes_cli_session", False):
            return None
        return await self.store.cli_session(turn.session_id)

    async def _attempt(self, turn: TurnRecord, key: str, earlier: _Earlier) -> bool:
        """Run one attempt; returns True when it was abandoned for shutdown."""
        retention = self.settings.stream_retention
        # Fence out every older attempt before reading where the log ends: a
        # frozen owner of the previous attempt that wakes up now writes nothing.
        info = await self.events.claim(turn.id, turn.attempt, retention)
        # No log on a retry means an earlier attempt's frames were lost (Redis,
        # or serve's in-memory log, restarted): jump the sequence past anything
        # a reader may hold, so old cursors answer 410 instead of resuming into
        # frames of another attempt.
        lost = not info.exists and turn.attempt > 1
        last = (turn.attempt - 1) * SEQ_EPOCH if lost else info.last_seq
        assembler = Assembler()
        paused_at = turn.paused.attempt if turn.paused is not None else 0
        if turn.paused is not None:
            assembler.restore(turn.paused.parts)
        writer = FrameWriter(
            self.events,
            turn.id,
            last + 1,
            epoch=turn.attempt,
            ttl=retention,
            on_written=self.metrics.frames_written,
            snapshot=lambda: [chunks.start(turn.assistant_message_id), *assembler.snapshot()],
            restart=lost,
        )
        try:
            if lost:
                writer.add(chunks.data("stream-reset", {"seq": last + 1}, transient=True))
            if last == 0 or lost or turn.attempt == paused_at + 1:
                # (after a pause, the continuation's readers begin here too)
                writer.add(chunks.start(turn.assistant_message_id))
            if turn.attempt > paused_at + 1:
                writer.add(chunks.data("turn-retry", {"attempt": turn.attempt}, transient=True))
            if turn.paused is not None and (lost or turn.attempt > paused_at + 1):
                # A reader rebuilds the message from here (a retry or a reset
                # starts it over), but this attempt goes on from the pause:
                # give it the message up to the pause again.
                writer.add(*assembler.snapshot())
            await writer.flush()
            return await self._run_attempt(turn, key, earlier, assembler, writer)
        except StaleWriter:
            return False  # a newer attempt claimed the log: it owns the turn
        finally:
            await writer.close()

    async def _run_attempt(
        self,
        turn: TurnRecord,
        key: str,
        earlier: _Earlier,
        assembler: Assembler,
        writer: FrameWriter,
    ) -> bool:
        loop = asyncio.get_running_loop()
        began = loop.time()
        task = asyncio.create_task(
            self._drive(turn, earlier, assembler, writer), name=f"turn:{turn.id}"
        )
        run = self.running.add(turn.id, task)
        writer.on_fenced = lambda: run.stop(StopReason.LEASE_LOST)
        if turn.cancel_requested:
            run.stop(StopReason.CANCEL)
        done = asyncio.Event()  # the attempt is over: the heartbeat stops
        beat = asyncio.create_task(self._heartbeat(turn, run, key, assembler, writer, done))
        self.metrics.active_turns.inc()
        status, error = TurnStatus.COMPLETED, None
        paused: _Paused | None = None
        try:
            paused = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this worker itself is being cancelled
            if run.reason is not StopReason.CANCEL:
                return run.reason is StopReason.SHUTDOWN
            status = TurnStatus.CANCELLED
        except StaleWriter:
            return False
        except TimeoutError:
            status = TurnStatus.FAILED
            error = f"the turn timed out after {self.settings.turn_timeout:g} s"
        except RuntimeFailure as exc:
            status, error = TurnStatus.FAILED, exc.detail
        except Exception as exc:
            log.exception("turn %s failed", turn.id)
            status, error = TurnStatus.FAILED, f"internal error ({type(exc).__name__})"
        finally:
            try:
                await self._stop_heartbeat(turn, beat, done)
            finally:
                self.running.remove(turn.id)
                self.metrics.active_turns.dec()

        writer.add(*assembler.close())
        await writer.flush()
        if paused is not None:
            if await self._pause(turn, paused, assembler, writer):
                return False
            status = TurnStatus.CANCELLED  # not paused: a cancel came first
        outcome = TurnOutcome(
            status,
            content=assembler.content,
            parts=persisted_parts(assembler.parts),
            error=error,
            usage=assembler.usage,
        )
        if await self._finish(turn, outcome):
            # The terminal append also gives the log its retention.
            await writer.write_now(*terminal_chunks(status, error, assembler.usage))
            took = loop.time() - began
            self.metrics.turn_finished(status.value, took)
            log.info("turn %s %s in %.2f s (attempt %d)", turn.id, status.value, took, turn.attempt)
        return False

    async def _pause(
        self, turn: TurnRecord, paused: _Paused, assembler: Assembler, writer: FrameWriter
    ) -> bool:
        """Persist the pause and end the readers' streams; False when a cancel
        was asked first (the turn ends cancelled instead). A fenced-out attempt
        raises ``StaleWriter`` at its next write, as anywhere else."""
        pause = TurnPause(
            attempt=turn.attempt,
            seq=writer.last_seq + 1,  # the pause frame
            state=paused.state,
            content=assembler.content,
            parts=persisted_parts(assembler.parts),
            approval_ids=[r.id for r in paused.requests],
        )
        expires = datetime.now(UTC) + timedelta(seconds=self.settings.approval_timeout)
        if not await self.store.pause_turn(turn.id, turn.attempt, pause, paused.requests, expires):
            current = await self.store.get_turn(turn.id)
            if current.attempt != turn.attempt or not current.status.active:
                raise StaleWriter(f"turn {turn.id}: attempt {turn.attempt} no longer holds it")
            return False
        await writer.write_now(chunks.pause())
        log.info(
            "turn %s paused for %d approval(s): %s",
            turn.id,
            len(paused.requests),
            ", ".join(r.tool_name for r in paused.requests),
        )
        return True

    async def _finish(self, turn: TurnRecord, outcome: TurnOutcome) -> bool:
        """The terminal CAS, retried through a short database outage. A retry
        after a failure whose commit may have landed reads the turn back: the
        CAS of this attempt that already won answers "won", not "lost" (only
        this attempt can finish it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINISH_BUDGET
        uncertain = False
        delay = 0.1
        while True:
            try:
                with tracing.span(
                    "turn.finish",
                    turn_id=turn.id,
                    attempt=turn.attempt,
                    status=outcome.status.value,
                ):
                    won = await self.store.finish_turn(turn.id, turn.attempt, outcome)
                break
            except BackendUnavailable as exc:
                if loop.time() + delay > deadline:
                    raise
                log.warning("turn %s: finishing: %s; retrying", turn.id, exc.detail)
                uncertain = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if won or not uncertain:
            return won
        current = await self.store.get_turn(turn.id)
        return current.attempt == turn.attempt and current.status is outcome.status

    async def _drive(
        self,
        turn: TurnRecord,
        earlier: _Earlier,
        assembler: Assembler,
        writer: FrameWriter,
    ) -> _Paused | None:
        model = ModelRef.parse(turn.model)
        runtime = self.runtimes.get(model.provider)
        if runtime is None:
            raise RuntimeFailure(f"no runtime for provider {model.provider!r} on this executor")
        ctx = TurnContext(
            turn_id=turn.id,
            session_id=turn.session_id,
            user_id=turn.user_id,
            attempt=turn.attempt,
            model=model,
            system_prompt=self.settings.system_prompt,
            user_text=turn.user_text,
            seq=turn.seq,
            history=earlier.history,
            history_tokens=self.settings.history_tokens,
            cli_session_id=earlier.cli_session,
            record_cli_session=functools.partial(self.store.set_cli_session, turn.session_id),
            resume=earlier.resume,
            take_steers=functools.partial(self.store.take_steers, turn.id, turn.attempt),
        )
        paused: _Paused | None = None
        requests: list[NewApproval] = []
        # aclosing: on cancel or timeout the runtime's generator is closed at once,
        # so it closes the model's HTTP stream or ends its child process.
        spans = tracing.EventSpans() if tracing.enabled() else None
        try:
            async with (
                asyncio.timeout(self.settings.turn_timeout),
                contextlib.aclosing(runtime.run(ctx)) as events,
            ):
                async for event in events:
                    if isinstance(event, Pause):
                        paused = _Paused(event.state, requests)
                        break
                    if isinstance(event, ApprovalRequest):
                        requests.append(
                            NewApproval(
                                event.approval_id, event.call_id, event.tool_name, event.input
                            )
                        )
                    writer.add(*assembler.feed(event))
                    if spans is not None:
                        spans.feed(event)
        finally:
            if spans is not None:
                spans.close()
        await writer.flush()
        return paused if paused is not None and requests else None

    async def _stop_heartbeat(
        self, turn: TurnRecord, beat: asyncio.Task[None], done: asyncio.Event
    ) -> None:
        """Stop the heartbeat, and never wait on it for long: under a heavy load
        a cancelled heartbeat was seen not to end (its cancellation lost inside
        a backend call), and the attempt then never wrote its end. The flag
        ends its loop at the next round whatever became of the cancellation."""
        done.set()
        beat.cancel()
        finished, _ = await asyncio.wait({beat}, timeout=HEARTBEAT_STOP_WAIT)
        if not finished:
            log.warning(
                "turn %s: the heartbeat did not stop within %g s; going on without it",
                turn.id,
                HEARTBEAT_STOP_WAIT,
            )
        elif not beat.cancelled() and beat.exception() is not None:
            log.warning("turn %s: the heartbeat failed: %r", turn.id, beat.exception())

    async def _heartbeat(
        self,
        turn: TurnRecord,
        run: Run,
        key: str,
        assembler: Assembler,
        writer: FrameWriter,
        done: asyncio.Event,
    ) -> None:
        """Every TTL/3: keep the lease and the stream alive (restoring a stream
        Redis lost), notice a missed cancel or a deleted turn, and checkpoint the
        answer so far (``GET /sessions/{id}`` shows it while the turn runs)."""
        interval = self.settings.lease_ttl / 3
        saved = 0
        while not done.is_set():
            await asyncio.sleep(interval)
            if done.is_set():
                return
            try:
                ttl = self.settings.lease_ttl
                # A failed refresh may mean Redis restarted empty: take the lease
                # again if it is free; if someone else holds it, they own the turn.
                if not await self.lease.refresh(key, self.owner, ttl) and not (
                    await self.lease.acquire(key, self.owner, ttl)
                ):
                    run.stop(StopReason.LEASE_LOST)
                    return
                if not await self.events.touch(turn.id, self.settings.stream_retention):
                    writer.restore()  # Redis lost the log during a silent stretch
                current = await self.store.get_turn(turn.id)
            except TurnNotFound:
                run.stop(StopReason.GONE)
                return
            except TurnrelayError as exc:
                log.warning("turn %s heartbeat: %s", turn.id, exc.detail)
                continue
            if current.attempt != turn.attempt or not current.status.active:
                run.stop(StopReason.LEASE_LOST)
                return
            if current.cancel_requested:
                run.stop(StopReason.CANCEL)
                return
            if len(assembler.parts) + len(assembler.content) != saved:
                saved = len(assembler.parts) + len(assembler.content)
                try:
                    await self.store.save_partial(
                        turn.id,
                        turn.attempt,
                        assembler.content,
                        persisted_parts(assembler.parts),
                    )
                except TurnrelayError as exc:
                    log.warning("turn %s checkpoint: %s", turn.id, exc.detail)
