"""The UI Message Stream chunks turnrelay writes (AI SDK protocol v1).

Builders return plain dicts with exactly the keys the AI SDK's strict chunk
schemas accept; ``encode`` turns one into the compact JSON a frame carries.
"""

from __future__ import annotations

import json
from typing import Any

Chunk = dict[str, Any]

FINISH = "finish"


def encode(chunk: Chunk) -> str:
    return json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)


_RESET_PREFIX = encode({"type": "data-stream-reset"})[:-1] + ","


def is_reset(encoded: str) -> bool:
    """The encoded chunk is a ``data-stream-reset`` (the first frame of a
    restarted log); ``encode`` writes ``type`` first, so a prefix test does."""
    return encoded.startswith(_RESET_PREFIX)


def start(message_id: str) -> Chunk:
    return {"type": "start", "messageId": message_id}


def start_step() -> Chunk:
    return {"type": "start-step"}


def finish_step() -> Chunk:
    return {"type": "finish-step"}


def text_start(part_id: str) -> Chunk:
    return {"type": "text-start", "id": part_id}


def text_delta(part_id: str, delta: str) -> Chunk:
    return {"type": "text-delta", "id": part_id, "delta": delta}


def text_end(part_id: str) -> Chunk:
    return {"type": "text-end", "id": part_id}


def reasoning_start(part_id: str) -> Chunk:
    return {"type": "reasoning-start", "id": part_id}


def reasoning_delta(part_id: str, delta: str) -> Chunk:
    return {"type": "reasoning-delta", "id": part_id, "delta": delta}


def reasoning_end(part_id: str) -> Chunk:
    return {"type": "reasoning-end", "id": part_id}


def tool_input_start(call_id: str, tool_name: str) -> Chunk:
    return {"type": "tool-input-start", "toolCallId": call_id, "toolName": tool_name}


def tool_input_delta(call_id: str, delta: str) -> Chunk:
    return {"type": "tool-input-delta", "toolCallId": call_id, "inputTextDelta": delta}


def tool_input_available(call_id: str, tool_name: str, input_: Any) -> Chunk:
    return {
        "type": "tool-input-available",
        "toolCallId": call_id,
        "toolName": tool_name,
        "input": input_,
    }


def tool_output_available(call_id: str, output: Any) -> Chunk:
    return {"type": "tool-output-available", "toolCallId": call_id, "output": output}


def tool_output_error(call_id: str, error_text: str) -> Chunk:
    return {"type": "tool-output-error", "toolCallId": call_id, "errorText": error_text}


def tool_approval_request(approval_id: str, call_id: str) -> Chunk:
    return {"type": "tool-approval-request", "approvalId": approval_id, "toolCallId": call_id}


def tool_output_denied(call_id: str) -> Chunk:
    return {"type": "tool-output-denied", "toolCallId": call_id}


def data(name: str, payload: Any, *, transient: bool = False) -> Chunk:
    chunk: Chunk = {"type": f"data-{name}", "data": payload}
    if transient:
        chunk["transient"] = True
    return chunk


def error(text: str) -> Chunk:
    return {"type": "error", "errorText": text}


def abort(reason: str | None = None) -> Chunk:
    chunk: Chunk = {"type": "abort"}
    if reason:
        chunk["reason"] = reason
    return chunk


# ``finishReason`` values both AI SDK 6 and 7 accept (7 adds "interrupted",
# which a version 6 client would refuse: a cancel reports "other").
FINISH_REASONS = ("stop", "length", "content-filter", "tool-calls", "error", "other")


def finish(metadata: dict[str, Any] | None = None, *, reason: str | None = None) -> Chunk:
    chunk: Chunk = {"type": FINISH}
    if reason is not None:
        assert reason in FINISH_REASONS, reason
        chunk["finishReason"] = reason
    if metadata:
        chunk["messageMetadata"] = metadata
    return chunk


# A turn waiting for tool approvals ends the reader's stream here, as the AI SDK
# does (``finish`` with ``tool-calls``), but not the turn's log: the attempt
# that continues the turn appends after it. So this frame is not the log's
# terminal frame; readers recognise it by its exact encoding.
AWAITING_APPROVAL = "awaiting_approval"


def pause() -> Chunk:
    return finish({"status": AWAITING_APPROVAL}, reason="tool-calls")


_PAUSE = encode(pause())


def is_terminal(chunk: Chunk) -> bool:
    """The chunk ends the turn's log: a ``finish`` that is not a pause."""
    return chunk["type"] == FINISH and encode(chunk) != _PAUSE


def is_pause(encoded: str) -> bool:
    return encoded == _PAUSE
