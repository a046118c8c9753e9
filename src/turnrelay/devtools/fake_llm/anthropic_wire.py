"""The Anthropic Messages wire format: ``POST /v1/messages`` and token counting."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse, Response

from turnrelay.devtools.fake_llm.record import _Recorder
from turnrelay.devtools.fake_llm.script import (
    MODEL_ID,
    Script,
    _plan,
    _prompt_chars,
    _Refusal,
    _Reply,
    _reply,
    _split_args,
)
from turnrelay.devtools.fake_llm.stream import _BrokenBody, _Stream


async def messages(recorder: _Recorder, index: int, body: dict[str, Any] | None) -> Response:
    """The answer to one request, already recorded as ``index``."""
    try:
        prompt, script = _plan(body)
    except _Refusal as refusal:
        return _anthropic_error(refusal.status, refusal.message)
    assert body is not None
    choice = body.get("tool_choice")
    allowed = not (isinstance(choice, dict) and choice.get("type") == "none")
    reply = _reply(prompt, script, _anthropic_tool_names(body), allowed)
    if body.get("stream"):
        return _anthropic_stream(recorder, index, body, reply, script)  # type: ignore[return-value]
    message = _anthropic_message(index, body, reply)
    if script.fail_after is not None:
        return _BrokenBody(json.dumps(message), media_type="application/json")
    return JSONResponse(message)


def count_tokens(body: dict[str, Any] | None) -> Response:
    if body is None:
        return _anthropic_error(400, "request body is not a JSON object")
    return JSONResponse({"input_tokens": max(1, _prompt_chars(body) // 4)})


_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _anthropic_error(status: int, message: str) -> JSONResponse:
    kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status)


def _event(payload: dict[str, Any]) -> bytes:
    """An Anthropic SSE event: named after its ``type``."""
    data = json.dumps(payload, separators=(",", ":")).encode()
    kind = str(payload["type"])
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def _anthropic_tool_names(body: dict[str, Any]) -> list[str]:
    return [
        tool["name"]
        for tool in body.get("tools") or ()
        if isinstance(tool, dict) and isinstance(tool.get("name"), str)
    ]


def _anthropic_blocks(
    index: int, reply: _Reply
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``(content_block_start block, its deltas)`` per content block."""
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    if reply.reasoning:
        deltas = [{"type": "thinking_delta", "thinking": text} for text in reply.reasoning]
        deltas.append({"type": "signature_delta", "signature": f"fake-signature-{index}"})
        blocks.append(({"type": "thinking", "thinking": "", "signature": ""}, deltas))
    if reply.pieces:
        deltas = [{"type": "text_delta", "text": text} for text in reply.pieces]
        blocks.append(({"type": "text", "text": ""}, deltas))
    if reply.tool_call is not None:
        name, arguments = reply.tool_call
        deltas = [
            {"type": "input_json_delta", "partial_json": piece} for piece in _split_args(arguments)
        ]
        block = {"type": "tool_use", "id": f"toolu_fake_{index}", "name": name, "input": {}}
        blocks.append((block, deltas))
    return blocks


def _anthropic_usage(body: dict[str, Any], reply: _Reply) -> dict[str, int]:
    return {
        "input_tokens": max(1, _prompt_chars(body) // 4),
        "output_tokens": len(reply.reasoning) + len(reply.pieces) + (reply.tool_call is not None),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _anthropic_stream(
    recorder: _Recorder, index: int, body: dict[str, Any], reply: _Reply, script: Script
) -> _Stream:
    usage = _anthropic_usage(body, reply)
    message: dict[str, Any] = {
        "id": f"msg_fake_{index}",
        "type": "message",
        "role": "assistant",
        "model": str(body.get("model") or MODEL_ID),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    head = [_event({"type": "message_start", "message": message}), _event({"type": "ping"})]
    frames: list[bytes] = []
    for i, (block, deltas) in enumerate(_anthropic_blocks(index, reply)):
        frames.append(_event({"type": "content_block_start", "index": i, "content_block": block}))
        frames += [
            _event({"type": "content_block_delta", "index": i, "delta": delta}) for delta in deltas
        ]
        frames.append(_event({"type": "content_block_stop", "index": i}))
    stop = "tool_use" if reply.tool_call is not None else "end_turn"
    tail = [
        _event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            }
        ),
        _event({"type": "message_stop"}),
    ]
    return _Stream(recorder=recorder, index=index, script=script, head=head, body=frames, tail=tail)


def _anthropic_message(index: int, body: dict[str, Any], reply: _Reply) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if reply.reasoning:
        signature = f"fake-signature-{index}"
        content.append(
            {"type": "thinking", "thinking": "".join(reply.reasoning), "signature": signature}
        )
    if reply.pieces:
        content.append({"type": "text", "text": "".join(reply.pieces)})
    if reply.tool_call is not None:
        name, arguments = reply.tool_call
        tool_use = {"type": "tool_use", "id": f"toolu_fake_{index}", "name": name}
        content.append({**tool_use, "input": json.loads(arguments)})
    return {
        "id": f"msg_fake_{index}",
        "type": "message",
        "role": "assistant",
        "model": str(body.get("model") or MODEL_ID),
        "content": content,
        "stop_reason": "tool_use" if reply.tool_call is not None else "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(body, reply),
    }
