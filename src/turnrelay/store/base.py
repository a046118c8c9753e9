"""The ChatStore port and its records.

Turn state changes are compare-and-set on ``(turn_id, attempt)`` with
``status IN ('queued','running')``: whoever wins the terminal CAS (the executor,
the API cancelling a queued turn, the sweeper) is the one that writes the turn's
terminal frames. Losing a CAS is an answer (``None`` / ``False``), not an error.

Per-session order: ``dispatch_next`` marks the session's earliest queued turn as
*dispatched* only when no other dispatched turn of the session is still active,
so at most one message per session is ever in the broker. Whoever publishes a
dispatched turn records the broker's confirm (``mark_published``); a head whose
confirm never came (its publisher died in between) is what the sweeper
republishes, and nothing else, so a backlog waiting in the broker is never
duplicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol


class TurnStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (TurnStatus.QUEUED, TurnStatus.RUNNING)


TERMINAL = (TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.CANCELLED)


class Multitask(StrEnum):
    ENQUEUE = "enqueue"
    REJECT = "reject"
    INTERRUPT = "interrupt"
    # Deliver it into the running turn at its next model step; if none takes
    # it, it is the session's next turn (as ``enqueue``).
    STEER = "steer"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    user_id: str
    title: str | None
    created_at: datetime
    updated_at: datetime
    cli_session_id: str | None = None


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: str
    session_id: str
    turn_id: str
    role: str  # "user" | "assistant"
    content: str
    parts: list[dict[str, Any]]
    status: TurnStatus
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TurnRecord:
    id: str
    session_id: str
    user_id: str
    seq: int  # the turn's position in its session, from 1
    status: TurnStatus
    attempt: int  # 0 while queued; 1 for the first run, n+1 for each retry
    model: str
    user_text: str
    user_message_id: str
    assistant_message_id: str
    client_message_id: str | None
    dispatched: bool
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None
    superseded_by: str | None = None  # the turn that answered its message again
    # Set when an attempt paused for tool approvals (see ``TurnPause``); kept
    # while later attempts continue from it, replaced by the next pause.
    paused: TurnPause | None = None
    # Approvals of that pause still unanswered: the turn waits while > 0.
    pending_approvals: int = 0
    # A steering message taken into that running turn (it has no answer of its own).
    steered_into: str | None = None

    @property
    def waiting(self) -> bool:
        """Waiting for approvals: no attempt runs it, none may until they are answered."""
        return (
            self.paused is not None
            and self.status is TurnStatus.RUNNING
            and self.paused.attempt == self.attempt
            and self.pending_approvals > 0
        )

    @property
    def resumable(self) -> bool:
        """Paused, every approval answered, and no attempt continued it yet."""
        return (
            self.paused is not None
            and self.status is TurnStatus.RUNNING
            and self.paused.attempt == self.attempt
            and self.pending_approvals == 0
        )


@dataclass(frozen=True, slots=True)
class TurnPause:
    """An attempt that stopped to wait for tool approvals, and what continues it.

    ``state`` is the runtime's own (for ``openai``: the model messages so far
    and the calls waiting); ``content``/``parts`` the assistant message as it
    stood, to continue assembling it; ``seq`` the pause's last frame, where the
    continuation's stream begins."""

    attempt: int
    seq: int
    state: dict[str, Any]
    content: str
    parts: list[dict[str, Any]]
    approval_ids: list[str]


@dataclass(frozen=True, slots=True)
class Steer:
    """A steering message a running turn took: before its model request ``step``
    (counted from 1 in the attempt that took it)."""

    turn_id: str  # the steering message's own turn
    message_id: str
    text: str
    step: int


@dataclass(frozen=True, slots=True)
class NewApproval:
    """A tool call the runtime holds back until the user answers."""

    id: str
    call_id: str
    tool_name: str
    input: Any


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    id: str
    turn_id: str
    call_id: str
    tool_name: str
    input: Any
    created_at: datetime
    expires_at: datetime
    approved: bool | None = None  # None: not answered yet
    reason: str | None = None
    decided_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    approval_id: str
    approved: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ApprovalAnswer:
    turn: TurnRecord
    approvals: list[ApprovalRecord]  # the pause's, as they stand now
    # This answer decided the pause's last approval: the caller publishes the
    # turn so an executor continues it.
    resume: bool


@dataclass(frozen=True, slots=True)
class NewTurn:
    session_id: str
    user_id: str
    text: str
    model: str
    client_message_id: str | None = None
    multitask: Multitask = Multitask.ENQUEUE
    max_running_per_user: int = 5
    # The user's turns waiting for a running slot (their FIFO); beyond: 429.
    max_waiting_per_user: int = 20
    max_queued_per_session: int = 10
    # Mark the new turn dispatched in the same transaction when the session has
    # no other active turn (it is the head): saves the API a second transaction
    # before it publishes.
    dispatch_if_idle: bool = False
    # Announce the turn's end here (a webhook), if anywhere.
    webhook_url: str | None = None
    # A regenerate: answer again, superseding the turn whose assistant message is
    # ``replaces_message_id`` (else the session's latest turn) and every later one.
    regenerate: bool = False
    replaces_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class SubmitResult:
    turn: TurnRecord
    created: bool  # False: an idempotent repeat of an earlier submit (same message_id)
    # Turns of the session that were active before this one (for ``interrupt``).
    earlier_active: list[TurnRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    """What the CAS winner persists when a turn ends."""

    status: TurnStatus
    content: str = ""
    parts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    usage: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One announcement of a turn's end, and how its sending went so far."""

    id: str  # also the ``webhook-id`` header: the same on every retry
    turn_id: str
    session_id: str
    url: str
    payload: dict[str, Any]
    status: str  # pending | delivered | failed
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None


class ExecutorStore(Protocol):
    """What an executor needs of the database: its turns' CAS steps, checkpoints,
    the session order (dispatch) and the sweeper's queries. Direct SQL and any
    proxy of the database are implementations of this one port; the API uses the
    whole ``ChatStore``."""

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def ping(self) -> None: ...

    # reads ----------------------------------------------------------------------
    async def history(self, session_id: str, before_seq: int) -> list[MessageRecord]:
        """Messages of the session's turns with ``seq < before_seq``, non-empty only."""
        ...

    async def get_turn(self, turn_id: str) -> TurnRecord:
        """Raises ``TurnNotFound``."""
        ...

    async def cli_session(self, session_id: str) -> str | None:
        """The Claude Code CLI's session id recorded for the session (what its next
        turn resumes), ``None`` before one is. Raises ``SessionNotFound``."""
        ...

    # the session order -----------------------------------------------------------
    async def dispatch_next(
        self,
        session_id: str,
        *,
        republish_before: datetime | None = None,
        max_running_per_user: int | None = None,
    ) -> TurnRecord | None:
        """The next turn to publish, marked dispatched: the session's next queued
        one if none is in flight; with ``max_running_per_user``, instead the
        oldest turn waiting in the session owner's FIFO across their sessions,
        if they have a running slot free; or, with ``republish_before``, this
        session's in-flight head whose publish was never confirmed and that was
        dispatched before that time (its publisher died)."""
        ...

    async def mark_published(self, turn_id: str) -> None:
        """The broker confirmed the turn's message (the sweeper leaves it alone)."""
        ...

    async def unpublished_heads(self, before: datetime, limit: int = 100) -> list[TurnRecord]:
        """Dispatched turns still queued whose publish was never confirmed,
        dispatched before ``before`` (the sweeper republishes them)."""
        ...

    async def undispatched_heads(self, limit: int = 100) -> list[TurnRecord]:
        """Sessions' earliest queued turns with no dispatched active turn (the sweeper)."""
        ...

    async def dispatched_active(
        self, limit: int = 500, *, running_only: bool = False
    ) -> list[TurnRecord]:
        """Dispatched turns still queued or running (only running ones with
        ``running_only``): the sweeper's orphan checks."""
        ...

    # an attempt's writes ---------------------------------------------------------
    async def start_turn(self, turn_id: str, attempt: int) -> TurnRecord | None:
        """CAS ``attempt -> attempt+1`` with status ``running``; ``None`` if lost."""
        ...

    async def save_partial(
        self, turn_id: str, attempt: int, content: str, parts: Sequence[dict[str, Any]]
    ) -> bool:
        """Checkpoint the assistant entry of a running attempt; ``False`` if fenced out."""
        ...

    async def finish_turn(self, turn_id: str, attempt: int, outcome: TurnOutcome) -> bool:
        """The terminal CAS; ``True`` for the single winner. A turn with a
        webhook URL gets its delivery in the same transaction."""
        ...

    # the webhook outbox ------------------------------------------------------------------
    async def claim_webhooks(self, limit: int, lease: float) -> list[WebhookDelivery]:
        """Pending deliveries that are due, each claimed for ``lease`` seconds
        (its ``attempts`` counted up): no other claimer gets it meanwhile, and
        a claimer that dies leaves it due again when the lease ends."""
        ...

    async def settle_webhook(
        self,
        delivery_id: str,
        attempt: int,
        *,
        delivered: bool,
        status_code: int | None,
        error: str | None,
        retry_in: float | None,
    ) -> None:
        """Record attempt ``attempt``: delivered; or due again in ``retry_in``
        seconds; or (``retry_in`` None) failed for good. A settle of an
        attempt that is not the delivery's latest changes nothing."""
        ...

    async def set_cli_session(self, session_id: str, cli_session_id: str) -> None:
        """Record the CLI's session id (its transcript is stored). Raises
        ``SessionNotFound``."""
        ...

    # tool approvals -----------------------------------------------------------------------
    async def pause_turn(
        self,
        turn_id: str,
        attempt: int,
        pause: TurnPause,
        approvals: Sequence[NewApproval],
        expires_at: datetime,
    ) -> bool:
        """CAS: attempt ``attempt`` of a running turn not asked to cancel stops
        to wait for ``approvals`` (answerable until ``expires_at``), and its
        assistant message is checkpointed; ``False`` if fenced out or cancelled."""
        ...

    async def take_steers(self, turn_id: str, attempt: int, step: int) -> list[Steer]:
        """Take the session's steering messages waiting behind running attempt
        ``attempt`` into it, before its model request ``step``; answers every
        steer the turn took so far (this and earlier attempts), in order. An
        attempt that no longer holds the turn takes none (and gets none)."""
        ...

    async def approvals(self, turn_id: str) -> list[ApprovalRecord]:
        """The turn's approval requests, oldest first."""
        ...

    async def expire_approvals(
        self, now: datetime, reason: str, limit: int = 100
    ) -> list[TurnRecord]:
        """Deny the approvals unanswered past their expiry with ``reason``; the
        turns this made resumable (to publish)."""
        ...


class ChatStore(ExecutorStore, Protocol):
    """The whole store: what the API uses, on top of the executor's port."""

    # sessions -------------------------------------------------------------------
    async def create_session(self, user_id: str) -> SessionRecord: ...

    async def get_session(self, session_id: str, user_id: str) -> SessionRecord:
        """Raises ``SessionNotFound`` for an unknown session or another user's."""
        ...

    async def list_sessions(
        self, user_id: str, *, limit: int, offset: int
    ) -> tuple[list[SessionRecord], int]: ...

    async def delete_session(self, session_id: str, user_id: str) -> None: ...

    async def messages(self, session_id: str) -> list[MessageRecord]:
        """One user and one assistant entry per turn, ordered by turn."""
        ...

    # turns ----------------------------------------------------------------------
    async def submit_turn(self, new: NewTurn) -> SubmitResult:
        """Write the user message, the empty assistant entry and the ``queued`` turn
        in one transaction. Raises ``SessionNotFound``, ``MessageIdConflict``,
        ``TurnAlreadyActive`` (multitask=reject), ``RateLimited`` (caps)."""
        ...

    async def active_turns(self, session_id: str) -> list[TurnRecord]:
        """The session's queued and running turns, in order."""
        ...

    async def webhook_deliveries(self, turn_id: str) -> list[WebhookDelivery]:
        """The turn's deliveries (its webhook log), oldest first."""
        ...

    async def turn_for_message(self, session_id: str, assistant_message_id: str) -> TurnRecord:
        """The session's turn whose assistant entry is ``assistant_message_id``;
        raises ``TurnNotFound``."""
        ...

    async def answer_approvals(self, turn_id: str, decisions: Sequence[Decision]) -> ApprovalAnswer:
        """Record the user's decisions on the turn's current pause. Repeating a
        decision is a no-op; raises ``ApprovalNotFound`` for an id not of the
        pause, ``ApprovalAlreadyAnswered`` for one decided otherwise,
        ``TurnNotWaiting`` when the turn waits for nothing."""
        ...

    async def request_cancel(self, turn_id: str) -> TurnRecord:
        """Flag the turn so an executor that missed the broadcast still stops it."""
        ...

    async def count_running_for_user(self, user_id: str) -> int:
        """The user's running slots in use: dispatched turns still active."""
        ...

    async def oldest_waiting(self, user_id: str) -> TurnRecord | None:
        """The turn first in the user's FIFO of turns waiting for a running slot."""
        ...

    async def queue_position(self, turn: TurnRecord) -> int | None:
        """The turn's place in its user's FIFO of turns waiting for a running
        slot (1 is next); ``None`` when it is not waiting for one."""
        ...
