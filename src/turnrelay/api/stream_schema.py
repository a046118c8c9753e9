"""The SSE stream's schema: one event per frame, its data a UI message chunk.

The chunk models follow the AI SDK's own strict chunk schemas (UI Message
Stream protocol v1): exactly these keys, the optional ones where the SDK
allows them. ``turnrelay.events.chunks`` builds the chunks; a unit test checks
every builder against these models, and the OpenAPI document publishes them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from turnrelay.api.cursor import CURSOR_PATTERN


def _omit_not_null(schema: dict[str, Any], cls: type) -> None:
    """An optional key is left out, never sent as ``null`` (the SDK's schemas
    take no ``null`` there): the document says so."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        branches = prop.get("anyOf")
        if name in required or not branches or {"type": "null"} not in branches:
            continue
        prop.pop("default", None)
        rest = [b for b in branches if b != {"type": "null"}]
        del prop["anyOf"]
        if len(rest) == 1:
            prop.update(rest[0])
        else:
            prop["anyOf"] = rest


class _Chunk(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_omit_not_null)


ProviderMetadata = dict[str, Any]


class StartChunk(_Chunk):
    type: Literal["start"]
    messageId: str | None = Field(None, description="The assistant entry's id.")
    messageMetadata: Any = None


class StartStepChunk(_Chunk):
    type: Literal["start-step"]


class FinishStepChunk(_Chunk):
    type: Literal["finish-step"]


class TextStartChunk(_Chunk):
    type: Literal["text-start", "reasoning-start"]
    id: str
    providerMetadata: ProviderMetadata | None = None


class TextDeltaChunk(_Chunk):
    type: Literal["text-delta", "reasoning-delta"]
    id: str
    delta: str
    providerMetadata: ProviderMetadata | None = None


class TextEndChunk(_Chunk):
    type: Literal["text-end", "reasoning-end"]
    id: str
    providerMetadata: ProviderMetadata | None = None


class ToolInputStartChunk(_Chunk):
    type: Literal["tool-input-start"]
    toolCallId: str
    toolName: str
    providerExecuted: bool | None = None
    dynamic: bool | None = None


class ToolInputDeltaChunk(_Chunk):
    type: Literal["tool-input-delta"]
    toolCallId: str
    inputTextDelta: str


class ToolInputAvailableChunk(_Chunk):
    type: Literal["tool-input-available"]
    toolCallId: str
    toolName: str
    input: Any
    providerExecuted: bool | None = None
    providerMetadata: ProviderMetadata | None = None
    dynamic: bool | None = None


class ToolOutputAvailableChunk(_Chunk):
    type: Literal["tool-output-available"]
    toolCallId: str
    output: Any
    providerExecuted: bool | None = None
    dynamic: bool | None = None
    preliminary: bool | None = None


class ToolOutputErrorChunk(_Chunk):
    type: Literal["tool-output-error"]
    toolCallId: str
    errorText: str
    providerExecuted: bool | None = None
    dynamic: bool | None = None


class ToolApprovalRequestChunk(_Chunk):
    """The call waits for the user's approval (the turn pauses after its step)."""

    type: Literal["tool-approval-request"]
    approvalId: str
    toolCallId: str


class ToolOutputDeniedChunk(_Chunk):
    """The call was not run: denied by the user, or unanswered in time."""

    type: Literal["tool-output-denied"]
    toolCallId: str


class DataChunk(_Chunk):
    """turnrelay's own: ``data-turn-retry {attempt}``, ``data-stream-reset {seq}``."""

    type: str = Field(pattern=r"^data-")
    id: str | None = None
    data: Any
    transient: bool | None = None


class ErrorChunk(_Chunk):
    type: Literal["error"]
    errorText: str


class AbortChunk(_Chunk):
    type: Literal["abort"]
    reason: str | None = None


class FinishChunk(_Chunk):
    type: Literal["finish"]
    finishReason: (
        Literal["stop", "length", "content-filter", "tool-calls", "error", "other", "unknown"]
        | None
    ) = None
    messageMetadata: Any = Field(
        None,
        description="turnrelay's: `{status, usage?}` (usage in tokens). A pause for "
        "tool approvals ends the response with `finishReason: tool-calls` and "
        "`status: awaiting_approval`; the turn goes on once they are answered.",
    )


class UIMessageChunk(
    RootModel[
        StartChunk
        | StartStepChunk
        | FinishStepChunk
        | TextStartChunk
        | TextDeltaChunk
        | TextEndChunk
        | ToolInputStartChunk
        | ToolInputDeltaChunk
        | ToolInputAvailableChunk
        | ToolOutputAvailableChunk
        | ToolOutputErrorChunk
        | ToolApprovalRequestChunk
        | ToolOutputDeniedChunk
        | DataChunk
        | ErrorChunk
        | AbortChunk
        | FinishChunk
    ]
):
    """One chunk of the AI SDK UI Message Stream protocol v1."""


class SseEvent(BaseModel):
    """One SSE event of a turn's stream, as an SSE parser reads it: ``id:``
    ``<turn_id>:<seq>`` (the cursor to resume after), and ``data:`` the JSON of
    one ``UIMessageChunk``, or ``[DONE]`` at the end. Heartbeats are SSE
    comments (``: ping``), which parsers skip. No ``event:`` field is sent, so
    parsers report the default ``message``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_omit_not_null)

    id: str | None = Field(
        None,
        pattern=CURSOR_PATTERN,
        description="`<turn_id>:<seq>`; `[DONE]` carries none (parsers repeat the last).",
    )
    event: Literal["message"] = "message"
    data: str = Field(
        json_schema_extra={
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/UIMessageChunk"},
                },
            ]
        },
        description="The JSON of a `UIMessageChunk`, or `[DONE]`.",
    )
    retry: int | None = None
