"""Turns runtime events into UI message stream chunks and the persisted message.

One assembler per attempt. It opens and closes text and reasoning parts, gives
every part a fresh id (a retried attempt never reuses the ids of the one before),
and accumulates the AI SDK UI message ``parts`` and the joined text that the
store persists when the turn ends, so what a reader saw and what is stored are
built by the same code.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from turnrelay.events import chunks
from turnrelay.events.chunks import Chunk
from turnrelay.runtime.base import (
    ApprovalAnswered,
    ApprovalRequest,
    ReasoningDelta,
    RuntimeEvent,
    SteerEntered,
    StepFinish,
    StepStart,
    TextDelta,
    ToolCall,
    ToolDenied,
    ToolFailed,
    ToolInputDelta,
    ToolInputStart,
    ToolResult,
    Usage,
)


class Assembler:
    def __init__(self) -> None:
        self.parts: list[dict[str, Any]] = []
        self._ids: list[str] = []  # each part's stream id ("" for a step boundary)
        self.usage: dict[str, int] | None = None
        self._open_kind: str | None = None  # "text" | "reasoning"
        self._open_id = ""
        self._open_part: dict[str, Any] | None = None
        self._in_step = False
        self._tools: dict[str, dict[str, Any]] = {}

    @property
    def content(self) -> str:
        return "".join(p["text"] for p in self.parts if p["type"] == "text")

    def feed(self, event: RuntimeEvent) -> list[Chunk]:
        out: list[Chunk] = []
        match event:
            case TextDelta(text=text):
                if text:
                    self._ensure_step(out)
                    self._ensure_open("text", out)
                    assert self._open_part is not None
                    self._open_part["text"] += text
                    out.append(chunks.text_delta(self._open_id, text))
            case ReasoningDelta(text=text):
                if text:
                    self._ensure_step(out)
                    self._ensure_open("reasoning", out)
                    assert self._open_part is not None
                    self._open_part["text"] += text
                    out.append(chunks.reasoning_delta(self._open_id, text))
            case StepStart():
                self._close_step(out)
                self._ensure_step(out)
            case StepFinish():
                self._close_step(out)
            case ToolInputStart(call_id=call_id, tool_name=name):
                self._ensure_step(out)
                self._close_open(out)
                self._tool_part(call_id, name)
                out.append(chunks.tool_input_start(call_id, name))
            case ToolInputDelta(call_id=call_id, delta=delta):
                if call_id in self._tools:
                    out.append(chunks.tool_input_delta(call_id, delta))
            case ToolCall(call_id=call_id, tool_name=name, input=input_):
                self._ensure_step(out)
                self._close_open(out)
                part = self._tool_part(call_id, name)
                part["input"] = input_
                part["state"] = "input-available"
                out.append(chunks.tool_input_available(call_id, name, input_))
            case ToolResult(call_id=call_id, output=output):
                done = self._tools.get(call_id)
                if done is not None:
                    done["output"] = output
                    done["state"] = "output-available"
                    out.append(chunks.tool_output_available(call_id, output))
            case ToolFailed(call_id=call_id, error=error):
                failed = self._tools.get(call_id)
                if failed is not None:
                    failed["errorText"] = error
                    failed["state"] = "output-error"
                    out.append(chunks.tool_output_error(call_id, error))
            case ApprovalRequest(call_id=call_id, approval_id=approval_id):
                asked = self._tools.get(call_id)
                if asked is not None:
                    asked["state"] = "approval-requested"
                    asked["approval"] = {"id": approval_id}
                    out.append(chunks.tool_approval_request(approval_id, call_id))
            case ApprovalAnswered(
                call_id=call_id, approval_id=approval_id, approved=ok, reason=why
            ):
                answered = self._tools.get(call_id)
                if answered is not None:
                    answered["state"] = "approval-responded"
                    answered["approval"] = {"id": approval_id, "approved": ok}
                    if why:
                        answered["approval"]["reason"] = why
            case ToolDenied(call_id=call_id):
                denied = self._tools.get(call_id)
                if denied is not None:
                    denied["state"] = "output-denied"
                    out.append(chunks.tool_output_denied(call_id))
            case SteerEntered(message_id=message_id, text=text):
                self._close_open(out)
                data = {"messageId": message_id, "text": text}
                self.parts.append({"type": "data-steer", "data": data})
                self._ids.append("")
                out.append(chunks.data("steer", data))
            case Usage(input_tokens=i, output_tokens=o):
                prev = self.usage or {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0}
                self.usage = {
                    "inputTokens": prev["inputTokens"] + i,
                    "outputTokens": prev["outputTokens"] + o,
                    "totalTokens": prev["totalTokens"] + i + o,
                }
        return out

    def snapshot(self) -> list[Chunk]:
        """Chunks that rebuild the message so far, with the same part ids, the
        open part left open (for a restarted event log)."""
        out: list[Chunk] = []
        step_open = False
        for part, pid in zip(self.parts, self._ids, strict=True):
            kind = part["type"]
            if kind == "data-steer":
                out.append(chunks.data("steer", part["data"]))
            elif kind == "step-start":
                if step_open:
                    out.append(chunks.finish_step())
                out.append(chunks.start_step())
                step_open = True
            elif kind == "text":
                out.append(chunks.text_start(pid))
                if part["text"]:
                    out.append(chunks.text_delta(pid, part["text"]))
                if part is not self._open_part:
                    out.append(chunks.text_end(pid))
            elif kind == "reasoning":
                out.append(chunks.reasoning_start(pid))
                if part["text"]:
                    out.append(chunks.reasoning_delta(pid, part["text"]))
                if part is not self._open_part:
                    out.append(chunks.reasoning_end(pid))
            else:
                name = kind.removeprefix("tool-")
                if part["state"] == "input-streaming":
                    out.append(chunks.tool_input_start(pid, name))
                    continue
                out.append(chunks.tool_input_available(pid, name, part["input"]))
                if "approval" in part:
                    out.append(chunks.tool_approval_request(part["approval"]["id"], pid))
                if part["state"] == "output-denied":
                    out.append(chunks.tool_output_denied(pid))
                elif part["state"] == "output-available":
                    out.append(chunks.tool_output_available(pid, part["output"]))
                elif part["state"] == "output-error":
                    out.append(chunks.tool_output_error(pid, part["errorText"]))
        if step_open and not self._in_step:
            out.append(chunks.finish_step())
        return out

    def restore(self, parts: list[dict[str, Any]]) -> None:
        """Go on from a paused attempt's message (its parts, all closed). Usage
        is not carried: a runtime reports the whole turn's when it ends."""
        self.parts = [dict(p) for p in parts]
        self._ids = []
        self._tools = {}
        for part in self.parts:
            if part["type"].startswith("tool-"):
                self._ids.append(part["toolCallId"])
                self._tools[part["toolCallId"]] = part
            else:
                plain = part["type"] in ("step-start", "data-steer")
                self._ids.append("" if plain else uuid.uuid4().hex)

    def close(self) -> list[Chunk]:
        """Chunks that end whatever is still open (before the terminal chunks)."""
        out: list[Chunk] = []
        self._close_step(out)
        return out

    # -- internals -------------------------------------------------------------------

    def _ensure_step(self, out: list[Chunk]) -> None:
        if not self._in_step:
            self._in_step = True
            self.parts.append({"type": "step-start"})
            self._ids.append("")
            out.append(chunks.start_step())

    def _close_step(self, out: list[Chunk]) -> None:
        self._close_open(out)
        if self._in_step:
            self._in_step = False
            out.append(chunks.finish_step())

    def _ensure_open(self, kind: str, out: list[Chunk]) -> None:
        if self._open_kind == kind:
            return
        self._close_open(out)
        self._open_kind = kind
        self._open_id = uuid.uuid4().hex
        self._open_part = {"type": kind, "text": "", "state": "streaming"}
        self.parts.append(self._open_part)
        self._ids.append(self._open_id)
        out.append(
            chunks.text_start(self._open_id)
            if kind == "text"
            else chunks.reasoning_start(self._open_id)
        )

    def _close_open(self, out: list[Chunk]) -> None:
        if self._open_kind is None:
            return
        assert self._open_part is not None
        self._open_part["state"] = "done"
        out.append(
            chunks.text_end(self._open_id)
            if self._open_kind == "text"
            else chunks.reasoning_end(self._open_id)
        )
        self._open_kind = None
        self._open_part = None

    def _tool_part(self, call_id: str, name: str) -> dict[str, Any]:
        part = self._tools.get(call_id)
        if part is None:
            part = {
                "type": f"tool-{name}",
                "toolCallId": call_id,
                "state": "input-streaming",
                "input": None,
            }
            self._tools[call_id] = part
            self.parts.append(part)
            self._ids.append(call_id)
        return part


def persisted_parts(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parts as stored: JSON-safe copies (tool outputs may be arbitrary objects)."""
    result: list[dict[str, Any]] = json.loads(json.dumps(parts, default=str))
    return result
