"""The reply script: directives in the user's text, and the answer they ask for.

Everything here is independent of the wire format; ``openai_wire`` and
``anthropic_wire`` turn a ``_Reply`` into frames.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MODEL_ID = "fake"

_DIRECTIVE = re.compile(r"fake:(tokens|reasoning|delay_ms|fail_after|error|steps)=(\S*)")
# A user message with this is not a prompt: the reply follows the prompt before
# it (a message that steered a running turn, say).
ASIDE = "fake:aside"
_TOOL_DIRECTIVE = re.compile(r"fake:tool=([A-Za-z0-9_.-]+)(:?)")
_PIECE = re.compile(r"\s*\S+")
_JSON = json.JSONDecoder()


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
    steps: int = 1  # with ``tool``: call it this many times, then answer


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
    clean = " ".join(_DIRECTIVE.sub(" ", text).replace(ASIDE, " ").split())
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
    tool_result: str | None  # the last one
    tool_results: int = 0  # how many since the prompt


def _prompt(messages: list[Any]) -> _Prompt:
    result: str | None = None
    count = 0
    for message in reversed(messages):
        if _is_tool_result(message):
            count += 1
            if result is None:
                result = _tool_result_text(message)
            continue
        if isinstance(message, dict) and message.get("role") == "user":
            text = _message_text(message.get("content"))
            if ASIDE in text:
                continue
            return _Prompt(text, result, count)
    return _Prompt("", result, count)


class _Refusal(Exception):
    """A request the fake answers with an HTTP error; each wire shapes the body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _plan(body: dict[str, Any] | None) -> tuple[_Prompt, Script]:
    """The prompt and script of one request, the same for both wire formats.
    Raises ``_Refusal`` for a malformed body or a ``fake:error`` directive."""
    if body is None:
        raise _Refusal(400, "request body is not a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Refusal(400, "messages must be a non-empty list")
    prompt = _prompt(messages)
    try:
        _, script = parse_directives(prompt.text)
    except ValueError as exc:
        raise _Refusal(400, str(exc)) from exc
    if script.error is not None:
        status = script.error if 400 <= script.error <= 599 else 500
        raise _Refusal(status, f"fake error {status} (fake:error directive)")
    return prompt, script


@dataclass(slots=True)
class _Reply:
    """One scripted model answer, independent of the wire format."""

    reasoning: list[str]
    pieces: list[str]
    tool_call: tuple[str, str] | None  # (name as offered, JSON arguments)


def _reply(prompt: _Prompt, script: Script, offered: list[str], tools_allowed: bool) -> _Reply:
    reasoning = [f"r{i}" if i == 0 else f" r{i}" for i in range(script.reasoning)]
    if script.tool is not None and tools_allowed:
        if prompt.tool_results < max(1, script.steps):
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


def _prompt_chars(body: dict[str, Any]) -> int:
    total = len(json.dumps(body.get("system") or ""))
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            total += len(_message_text(message.get("content")))
    return total
