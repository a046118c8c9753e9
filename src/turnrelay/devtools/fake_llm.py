"""A local LLM server with scripted, deterministic replies: OpenAI and Anthropic wire formats.

Tests, demos and benchmarks point a client at it: an OpenAI client with
``base_url=http://HOST:PORT/v1``, an Anthropic client or the Claude Code CLI with
``ANTHROPIC_BASE_URL=http://HOST:PORT``. It answers

    POST /v1/chat/completions        OpenAI chat completions (SSE stream or JSON)
    POST /v1/messages                Anthropic Messages (SSE stream of ``content_block_*``
                                     events, or JSON)
    POST /v1/messages/count_tokens   Anthropic token counting (an estimate)
    GET  /v1/models                  both formats' model lists

and records anything else it is sent, answering 404. The reply is
``Echo: <last user text>`` unless directives in the last user text say otherwise;
directives are stripped from the echoed text and may be combined:

    fake:tokens=N        reply ``t0 t1 … t(N-1)``, one chunk per token
    fake:reasoning=N     first stream ``r0 r1 …`` as reasoning (``reasoning_content``,
                         or a ``thinking`` block)
    fake:delay_ms=D      pause D ms between chunks
    fake:fail_after=N    stream N chunks, then break the connection (no end of stream)
    fake:error=STATUS    answer HTTP STATUS with an error body of the API's shape
    fake:tool=NAME:{…}   call tool NAME with those JSON arguments (``:{…}`` may be left
                         out); once the request carries the tool's result, reply
                         ``Tool NAME returned: <result>``. NAME also matches a tool the
                         request offers as ``<prefix>__NAME`` (an MCP tool's name). A
                         request whose ``tool_choice`` is none gets the echo instead.

The "last user text" is the last user message that is not a tool result, so the
directive still applies to the request that carries the tool's result.

With a record file, every request is appended as one JSON line
``{"event": "request", "request_index", "path", "t", "body"}`` and every streamed
response, when it ends, as ``{"event": "closed", "request_index", "t", "completed"}``:
``completed`` is false when the client went away or ``fail_after`` broke the stream,
so a test can prove that a model stream was closed. ``t`` is ``time.monotonic()``
(system-wide on Linux, comparable across processes). Each line is one unbuffered
append, so readers never see half a line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

DEFAULT_PORT = 8099
MODEL_ID = "fake"

_DIRECTIVE = re.compile(r"fake:(tokens|reasoning|delay_ms|fail_after|error)=(\S*)")
_TOOL_DIRECTIVE = re.compile(r"fake:tool=([A-Za-z0-9_.-]+)(:?)")
_PIECE = re.compile(r"\s*\S+")
_JSON = json.JSONDecoder()


class _AbruptClose(Exception):
    """Raised after the response has started: the ASGI server then drops the connection."""


class _QuietAbruptClose(logging.Filter):
    """Keeps uvicorn from logging a traceback for a ``fail_after`` we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _AbruptClose))


def _quiet_uvicorn() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietAbruptClose) for f in logger.filters):
        logger.addFilter(_QuietAbruptClose())


@dataclass(frozen=True, slots=True)
class Script:
    """What the directives of one request ask for."""

    tokens: int | None = None
    reasoning: int = 0
    delay_ms: int = 0
    fail_after: int | None = None
    error: int | None = None
    tool: str | None = None
    tool_args: dict[str, Any] = field(default_factory=dict)


def _cut_tool_directive(text: str) -> tuple[str, str | None, dict[str, Any]]:
    match = _TOOL_DIRECTIVE.search(text)
    if match is None:
        return text, None, {}
    end = match.end()
    args: Any = {}
    if match.group(2):
        try:
            args, end = _JSON.raw_decode(text, end)
        except ValueError:
            raise ValueError(
                f"fake:tool={match.group(1)}: needs a JSON object after the colon"
            ) from None
        if not isinstance(args, dict):
            raise ValueError(f"fake:tool={match.group(1)}: the arguments must be a JSON object")
    return text[: match.start()] + " " + text[end:], match.group(1), args


def parse_directives(text: str) -> tuple[str, Script]:
    """The text without its directives (whitespace collapsed), and the script."""
    text, tool, tool_args = _cut_tool_directive(text)
    values: dict[str, int] = {}
    for name, raw in _DIRECTIVE.findall(text):
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"fake:{name} needs an integer, got {raw!r}") from None
        if values[name] < 0:
            raise ValueError(f"fake:{name} must not be negative")
    clean = " ".join(_DIRECTIVE.sub(" ", text).split())
    return clean, Script(**values, tool=tool, tool_args=tool_args)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _is_tool_result(message: Any) -> bool:
    """An OpenAI ``tool`` message, or an Anthropic user message of tool results."""
    if not isinstance(message, dict):
        return False
    if message.get("role") == "tool":
        return True
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(part, dict) and part.get("type") == "tool_result" for part in content
    )


def _tool_result_text(message: dict[str, Any]) -> str:
    if message.get("role") == "tool":
        return _message_text(message.get("content"))
    texts = [
        _message_text(part.get("content"))
        for part in message.get("content") or ()
        if isinstance(part, dict) and part.get("type") == "tool_result"
    ]
    return " ".join(texts)


@dataclass(frozen=True, slots=True)
class _Prompt:
    """What a reply depends on: the user's text and any tool result after it."""

    text: str
    tool_result: str | None


def _prompt(messages: list[Any]) -> _Prompt:
    result: str | None = None
    for message in reversed(messages):
        if _is_tool_result(message):
            if result is None:
                result = _tool_result_text(message)
            continue
        if isinstance(message, dict) and message.get("role") == "user":
            return _Prompt(_message_text(message.get("content")), result)
    return _Prompt("", result)


def _last_user_text(messages: list[Any]) -> str:
    return _prompt(messages).text


@dataclass(slots=True)
class _Reply:
    """One scripted model answer, independent of the wire format."""

    reasoning: list[str]
    pieces: list[str]
    tool_call: tuple[str, str] | None  # (name as offered, JSON arguments)


def _reply(prompt: _Prompt, script: Script, offered: list[str], tools_allowed: bool) -> _Reply:
    reasoning = [f"r{i}" if i == 0 else f" r{i}" for i in range(script.reasoning)]
    if script.tool is not None and tools_allowed:
        if prompt.tool_result is None:
            name = _resolve_tool(script.tool, offered)
            return _Reply(reasoning, [], (name, json.dumps(script.tool_args)))
        return _Reply(
            reasoning, _PIECE.findall(f"Tool {script.tool} returned: {prompt.tool_result}"), None
        )
    clean, _ = parse_directives(prompt.text)
    return _Reply(reasoning, _reply_pieces(clean, script), None)


def _resolve_tool(name: str, offered: list[str]) -> str:
    if name in offered:
        return name
    suffixed = [tool for tool in offered if tool.endswith(f"__{name}")]
    return suffixed[0] if len(suffixed) == 1 else name


def _reply_pieces(clean: str, script: Script) -> list[str]:
    if script.tokens is not None:
        return [f"t{i}" if i == 0 else f" t{i}" for i in range(script.tokens)]
    # Word by word, so even a short echo streams as several deltas.
    return _PIECE.findall(f"Echo: {clean}" if clean else "Echo:")


def _split_args(arguments: str) -> list[str]:
    """JSON arguments in three pieces, so clients see them streamed."""
    step = max(1, -(-len(arguments) // 3))
    return [arguments[i : i + step] for i in range(0, len(arguments), step)] or [""]


def _error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(_error_body(status, message, kind), status_code=status)


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


class _Recorder:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._counter = itertools.count()

    def request(self, path: str, body: Any) -> int:
        index = next(self._counter)
        self._write({"event": "request", "request_index": index, "path": path, "body": body})
        return index

    def closed(self, index: int, *, completed: bool) -> None:
        self._write({"event": "closed", "request_index": index, "completed": completed})

    def _write(self, line: dict[str, Any]) -> None:
        if self.path is None:
            return
        line["t"] = time.monotonic()
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        # One unbuffered append per line: concurrent readers see whole lines only.
        with open(self.path, "ab", buffering=0) as file:
            file.write(data)


def _usage(prompt_chars: int, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = max(1, prompt_chars // 4)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _prompt_chars(body: dict[str, Any]) -> int:
    total = len(json.dumps(body.get("system") or ""))
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            total += len(_message_text(message.get("content")))
    return total


class _Stream:
    """A streamed response: ``head`` frames, then ``body`` frames (paced by
    ``delay_ms``, cut by ``fail_after``), then ``tail`` frames. It notices a client
    going away while it waits."""

    def __init__(
        self,
        *,
        recorder: _Recorder,
        index: int,
        script: Script,
        head: list[bytes],
        body: list[bytes],
        tail: list[bytes],
    ) -> None:
        self.recorder = recorder
        self.index = index
        self.script = script
        self.head, self.body, self.tail = head, body, tail
        self._closed = False

    async def _stream(self, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for frame in self.head:
            await self._send(send, frame)
        delay = self.script.delay_ms / 1000
        fail_after = self.script.fail_after
        for i, frame in enumerate(self.body):
            if fail_after is not None and i >= fail_after:
                break
            if i and delay:
                await asyncio.sleep(delay)
            await self._send(send, frame)
        if fail_after is not None:
            if delay:
                await asyncio.sleep(delay)
            raise _AbruptClose
        for frame in self.tail:
            await self._send(send, frame)
        # Recorded before the body ends, so a client that has read the end finds the line.
        self._record_closed(completed=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _record_closed(self, *, completed: bool) -> None:
        if not self._closed:
            self._closed = True
            self.recorder.closed(self.index, completed=completed)

    @staticmethod
    async def _send(send: Send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streamer = asyncio.ensure_future(self._stream(send))
        watcher = asyncio.ensure_future(self._wait_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streamer, watcher):
                task.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            self._record_closed(completed=False)
        if not streamer.cancelled() and isinstance(streamer.exception(), _AbruptClose):
            raise _AbruptClose


class _BrokenBody(Response):
    """Promises a full body, sends half of it, then drops the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        half = self.body[: len(self.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        raise _AbruptClose


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    """An Anthropic SSE event: named after its ``type``."""
    data = json.dumps(payload, separators=(",", ":")).encode()
    kind = str(payload["type"])
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


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


# -- Anthropic Messages --------------------------------------------------------------


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


def build_app(record_path: str | None = None) -> Starlette:
    """The fake server as an ASGI app; ``record_path`` appends JSON lines (see above)."""
    recorder = _Recorder(record_path)

    async def models(request: Request) -> Response:
        recorder.request(request.url.path, None)
        model: dict[str, Any] = {
            "id": MODEL_ID,
            "object": "model",
            "created": 0,
            "owned_by": "turnrelay",
            # The Anthropic shape of the same entry.
            "type": "model",
            "display_name": "Fake",
            "created_at": "1970-01-01T00:00:00Z",
        }
        return JSONResponse(
            {"object": "list", "data": [model], "has_more": False, "first_id": MODEL_ID}
        )

    async def read_body(request: Request) -> tuple[int, dict[str, Any] | None]:
        try:
            body = await request.json()
        except ValueError:
            return recorder.request(request.url.path, None), None
        index = recorder.request(request.url.path, body)
        return index, body if isinstance(body, dict) else None

    async def chat_completions(request: Request) -> Response:
        index, body = await read_body(request)
        if body is None:
            return _error(400, "request body is not JSON")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        prompt = _prompt(messages)
        try:
            _, script = parse_directives(prompt.text)
        except ValueError as exc:
            return _error(400, str(exc))
        if script.error is not None:
            status = script.error if 400 <= script.error <= 599 else 500
            kind = "server_error" if status >= 500 else "invalid_request_error"
            return _error(status, f"fake error {status} (fake:error directive)", kind)
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

    async def messages(request: Request) -> Response:
        index, body = await read_body(request)
        if body is None:
            return _anthropic_error(400, "request body is not a JSON object")
        turns = body.get("messages")
        if not isinstance(turns, list) or not turns:
            return _anthropic_error(400, "messages: must be a non-empty list")
        prompt = _prompt(turns)
        try:
            _, script = parse_directives(prompt.text)
        except ValueError as exc:
            return _anthropic_error(400, str(exc))
        if script.error is not None:
            status = script.error if 400 <= script.error <= 599 else 500
            return _anthropic_error(status, f"fake error {status} (fake:error directive)")
        choice = body.get("tool_choice")
        allowed = not (isinstance(choice, dict) and choice.get("type") == "none")
        reply = _reply(prompt, script, _anthropic_tool_names(body), allowed)
        if body.get("stream"):
            return _anthropic_stream(recorder, index, body, reply, script)  # type: ignore[return-value]
        message = _anthropic_message(index, body, reply)
        if script.fail_after is not None:
            return _BrokenBody(json.dumps(message), media_type="application/json")
        return JSONResponse(message)

    async def count_tokens(request: Request) -> Response:
        _, body = await read_body(request)
        if body is None:
            return _anthropic_error(400, "request body is not a JSON object")
        return JSONResponse({"input_tokens": max(1, _prompt_chars(body) // 4)})

    async def anything_else(request: Request) -> Response:
        body: Any = None
        with contextlib.suppress(ValueError):
            body = await request.json()
        recorder.request(request.url.path, body)
        return _anthropic_error(404, f"the fake LLM has no {request.method} {request.url.path}")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/{path:path}", anything_else, methods=methods),
        ]
    )


def _config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    _quiet_uvicorn()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=1,
    )


def _bound_port(server: uvicorn.Server) -> int:
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return port


class _AnnouncingServer(uvicorn.Server):
    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(
                f"fake-llm listening on http://{self.config.host}:{_bound_port(self)}", flush=True
            )


def serve(host: str, port: int, record_path: str | None) -> None:
    """Run the server until interrupted; prints ``fake-llm listening on http://HOST:PORT``
    (the real port when ``port`` is 0) once it accepts connections."""
    _AnnouncingServer(_config(build_app(record_path), host, port)).run()


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The host process owns the signals; FakeLLM.__aexit__ stops this server.
        yield


class FakeLLM:
    """The fake server in the current event loop, on a free port::

    async with FakeLLM(record_path=path) as llm:
        client = AsyncOpenAI(base_url=llm.base_url, api_key="unused")
    """

    def __init__(self, record_path: str | None = None, host: str = "127.0.0.1") -> None:
        self.record_path = record_path
        self.host = host
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url``, ``/v1`` included."""
        return f"http://{self.host}:{self.port}/v1"

    async def __aenter__(self) -> FakeLLM:
        server = _EmbeddedServer(_config(build_app(self.record_path), self.host, 0))
        self._server = server
        self._task = asyncio.create_task(server.serve())
        while not server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("fake-llm did not start")
            await asyncio.sleep(0.01)
        self.port = _bound_port(server)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        await self._task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fake-llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--record", metavar="FILE", help="append requests as JSON lines")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.record)


if __name__ == "__main__":
    main()
