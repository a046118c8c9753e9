"""The OpenAI chat completions wire format: ``POST /v1/chat/completions``."""

from __future__ import annotations

import asyncio
import json
import time
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


async def chat_completions(
    recorder: _Recorder, index: int, body: dict[str, Any] | None
) -> Response:
    """The answer to one request, already recorded as ``index``."""
    try:
        prompt, script = _plan(body)
    except _Refusal as refusal:
        kind = "server_error" if refusal.status >= 500 else "invalid_request_error"
        return _error(refusal.status, refusal.message, kind)
    assert body is not None
    allowed = body.get("tool_choice") != "none"
    reply = _reply(prompt, script, _openai_tool_names(body), allowed)
    if body.get("stream"):
        return _openai_stream(recorder, index, body, reply, script)  # type: ignore[return-value]
    if script.delay_ms:
        await asyncio.sleep(script.delay_ms * max(0, len(reply.pieces) - 1) / 1000)
    completion = _openai_completion(index, body, reply)
    if script.fail_after is not None:
        return _BrokenBody(json.dumps(completion), media_type="application/json")
    return JSONResponse(completion)


def _error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(_error_body(status, message, kind), status_code=status)


def _usage(prompt_chars: int, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = max(1, prompt_chars // 4)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


# -- OpenAI chat completions ---------------------------------------------------------


def _openai_tool_names(body: dict[str, Any]) -> list[str]:
    names = []
    for tool in body.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def _openai_stream(
    recorder: _Recorder, index: int, body: dict[str, Any], reply: _Reply, script: Script
) -> _Stream:
    model = str(body.get("model") or MODEL_ID)
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    base: dict[str, Any] = {
        "id": f"chatcmpl-fake-{index}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }
    if include_usage:
        base["usage"] = None  # as OpenAI does: null on every chunk but the last

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice]})

    frames = [chunk({"reasoning_content": text}) for text in reply.reasoning]
    frames += [chunk({"content": text}) for text in reply.pieces]
    finish = "stop"
    if reply.tool_call is not None:
        name, arguments = reply.tool_call
        call_id = f"call_fake_{index}"
        start = {"index": 0, "id": call_id, "type": "function"}
        start["function"] = {"name": name, "arguments": ""}
        frames.append(chunk({"tool_calls": [start]}))
        frames += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in _split_args(arguments)
        ]
        finish = "tool_calls"
    tail = [chunk({}, finish)]
    if include_usage:
        usage = _usage(_prompt_chars(body), len(reply.reasoning) + len(reply.pieces))
        tail.append(_sse({**base, "choices": [], "usage": usage}))
    tail.append(b"data: [DONE]\n\n")
    head = [chunk({"role": "assistant", "content": ""})]
    return _Stream(recorder=recorder, index=index, script=script, head=head, body=frames, tail=tail)


def _openai_completion(index: int, body: dict[str, Any], reply: _Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.pieces)}
    if reply.reasoning:
        message["reasoning_content"] = "".join(reply.reasoning)
    finish = "stop"
    if reply.tool_call is not None:
        name, arguments = reply.tool_call
        message["content"] = message["content"] or None
        message["tool_calls"] = [
            {
                "id": f"call_fake_{index}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ]
        finish = "tool_calls"
    return {
        "id": f"chatcmpl-fake-{index}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or MODEL_ID),
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(_prompt_chars(body), len(reply.reasoning) + len(reply.pieces)),
    }
