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

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

from turnrelay.settings import ModelRef
from turnrelay.store.base import MessageRecord


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
    | Usage
)


@dataclass(frozen=True, slots=True)
class TurnContext:
    turn_id: str
    session_id: str
    user_id: str
    attempt: int
    model: ModelRef
    system_prompt: str
    user_text: str
    # The session's earlier turns (``seq`` below this turn's), oldest first.
    history: list[MessageRecord] = field(default_factory=list)
    history_tokens: int = 32000


class AgentRuntime(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    def run(self, ctx: TurnContext) -> AsyncGenerator[RuntimeEvent, None]: ...
