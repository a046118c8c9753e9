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


@dataclass(frozen=True, slots=True)
class NewTurn:
    session_id: str
    user_id: str
    text: str
    model: str
    client_message_id: str | None = None
    multitask: Multitask = Multitask.ENQUEUE
    max_running_per_user: int = 5
    max_queued_per_session: int = 10
    # Mark the new turn dispatched in the same transaction when the session has
    # no other active turn (it is the head): saves the API a second transaction
    # before it publishes.
    dispatch_if_idle: bool = False


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

    # the session order -----------------------------------------------------------
    async def dispatch_next(
        self, session_id: str, *, republish_before: datetime | None = None
    ) -> TurnRecord | None:
        """The session's head turn to publish: the next queued one, marked
        dispatched, if none is in flight; or, with ``republish_before``, the
        in-flight head whose publish was never confirmed and that was dispatched
        before that time (its publisher died)."""
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
        """The terminal CAS; ``True`` for the single winner."""
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

    async def set_cli_session(self, session_id: str, cli_session_id: str) -> None: ...

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

    async def request_cancel(self, turn_id: str) -> TurnRecord:
        """Flag the turn so an executor that missed the broadcast still stops it."""
        ...

    async def count_active_for_user(self, user_id: str) -> int:
        """The user's sessions that have a queued or running turn (the per-user cap)."""
        ...
