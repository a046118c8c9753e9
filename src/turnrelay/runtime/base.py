"""The AgentRuntime port.

A runtime runs one attempt of one turn and yields ``RuntimeEvent``s: plain facts
("some text arrived", "the model called a tool"). It knows nothing of the wire
format: the executor's assembler turns events into UI message stream chunks,
gives parts their ids and accumulates the persisted message, so every runtime
streams the same protocol.

A runtime raises ``ModelError`` (or another ``RuntimeFailure``) when the model
fails; whatever it yielded before stays part of the turn. Cancellation arrives
as ``asyncio.CancelledError`` in the iterating task; a runtime must release its
resources (close the model's HTTP stream, end a child process) on it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from turnrelay.settings import ModelRef
from turnrelay.store.base import MessageRecord, Steer


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class StepStart:
    pass


@dataclass(frozen=True, slots=True)
class StepFinish:
    pass


@dataclass(frozen=True, slots=True)
class ToolInputStart:
    call_id: str
    tool_name: str


@dataclass(frozen=True, slots=True)
class ToolInputDelta:
    call_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The complete input of a tool call is known."""

    call_id: str
    tool_name: str
    input: Any


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    output: Any


@dataclass(frozen=True, slots=True)
class ToolFailed:
    call_id: str
    error: str


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """The call (already shown by ``ToolCall``) waits for the user's approval."""

    call_id: str
    approval_id: str
    tool_name: str
    input: Any


@dataclass(frozen=True, slots=True)
class ApprovalAnswered:
    """The user's answer to a request, as the continuing attempt found it."""

    call_id: str
    approval_id: str
    approved: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ToolDenied:
    """The call was not run: the user denied it (or did not answer in time)."""

    call_id: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class SteerEntered:
    """A message the user sent while the turn ran went into it here: the model's
    next request has it as a user message."""

    message_id: str
    text: str


@dataclass(frozen=True, slots=True)
class Pause:
    """The runtime's last event when it holds calls back: the turn stops until
    every ``ApprovalRequest`` is answered, then continues from ``state`` (JSON)
    in a later attempt, on any executor (``TurnContext.resume``)."""

    state: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


RuntimeEvent = (
    TextDelta
    | ReasoningDelta
    | StepStart
    | StepFinish
    | ToolInputStart
    | ToolInputDelta
    | ToolCall
    | ToolResult
    | ToolFailed
    | ApprovalRequest
    | ApprovalAnswered
    | ToolDenied
    | SteerEntered
    | Pause
    | Usage
)


@dataclass(frozen=True, slots=True)
class Resume:
    """What a paused turn continues from: the runtime's ``Pause.state`` and the
    answers, ``approval_id -> (approved, reason)``."""

    state: dict[str, Any]
    answers: dict[str, tuple[bool, str | None]]


@dataclass(frozen=True, slots=True)
class TurnContext:
    turn_id: str
    session_id: str
    user_id: str
    attempt: int
    model: ModelRef
    system_prompt: str
    user_text: str
    seq: int = 1  # the turn's position in its session
    # The session's earlier turns (``seq`` below this turn's), oldest first.
    history: list[MessageRecord] = field(default_factory=list)
    history_tokens: int = 32000
    # The Claude Code CLI's session that the session's last stored transcript
    # belongs to, and how to record a new one (runtime ``claude``).
    cli_session_id: str | None = None
    record_cli_session: Callable[[str], Awaitable[None]] | None = None
    # Set when this attempt continues a turn that paused for approvals.
    resume: Resume | None = None
    # Steering: before model request ``step`` (from 1), the messages the user
    # sent meanwhile, and every one the turn took before (a retry starts over);
    # a runtime inserts each once, before the request of its ``step``.
    take_steers: Callable[[int], Awaitable[list[Steer]]] | None = None


async def new_steers(ctx: TurnContext, request: int, steered: list[str]) -> list[Steer]:
    """The steering messages to put before model request ``request``: those the
    turn took that this attempt has not put in yet (``steered``, their ids, is
    kept up to date). A retry starts over and gets the earlier attempt's again:
    each goes in once, at the first request that finds it."""
    if ctx.take_steers is None:
        return []
    fresh = [s for s in await ctx.take_steers(request) if s.message_id not in steered]
    steered.extend(s.message_id for s in fresh)
    return fresh


class AgentRuntime(Protocol):
    """Runs turns of one provider. A runtime whose turns resume the CLI's own
    session also sets ``resumes_cli_session = True``: only then does the runner
    read the session's CLI session id into ``TurnContext.cli_session_id``."""

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    def run(self, ctx: TurnContext) -> AsyncGenerator[RuntimeEvent, None]: ...
