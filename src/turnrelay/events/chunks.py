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


def data(name: str, payload: Any, *, transient: bool = False) -> Chunk:
    chunk: Chunk = {"type": f"data-{name}", "data": payload}
    if transient:
        chunk["transient"] = True
    return chunk


def error(text: str) -> Chunk:
    return {"type": "error", "errorText": text}


def abort() -> Chunk:
    return {"type": "abort"}


def finish(metadata: dict[str, Any] | None = None) -> Chunk:
    chunk: Chunk = {"type": FINISH}
    if metadata:
        chunk["messageMetadata"] = metadata
    return chunk
