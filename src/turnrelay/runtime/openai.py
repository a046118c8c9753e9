"""Runtime ``openai``: any OpenAI-compatible chat completions endpoint.

OpenAI, OpenRouter, vLLM, Ollama, llama.cpp: one streamed ``/chat/completions``
call per model step, through the official SDK's ``AsyncOpenAI`` (auth, retries of
failed requests, status errors). The response body is read as raw SSE rather than
as the SDK's chunk objects: building a pydantic model per chunk costs about 0.2 ms
of CPU, five to seven times the cost of ``json.loads`` on the same line, and a
turn streams thousands of chunks while other turns share the executor's core.

Configuration is explicit: the composition root reads ``OPENAI_BASE_URL`` and
``OPENAI_API_KEY`` and passes them in; this module never reads the environment.

A model step yields ``StepStart`` once the endpoint accepted the request, then
``TextDelta`` / ``ReasoningDelta`` as they arrive, then ``StepFinish``. The turn
ends with one ``Usage`` summed over its steps, when the endpoint reported usage.
Every failure becomes a ``ModelError`` with a one-line message; on cancellation
the HTTP response is closed, so the endpoint sees the client go away.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, Any, cast

import httpx
import openai

from turnrelay.errors import ModelError
from turnrelay.runtime.base import (
    ReasoningDelta,
    RuntimeEvent,
    StepFinish,
    StepStart,
    TextDelta,
    TurnContext,
    Usage,
)
from turnrelay.store.base import MessageRecord

if TYPE_CHECKING:
    import httpx2
    from openai.types.chat import ChatCompletionMessageParam

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Local servers ignore the key, but the SDK refuses to build a client without one.
PLACEHOLDER_API_KEY = "unused"
# Rough and provider-independent; the history bound needs no tokenizer.
CHARS_PER_TOKEN = 4
# What a message costs beyond its text (role and framing tokens).
MESSAGE_OVERHEAD_TOKENS = 4

# Errors of the HTTP library while reading a body the SDK already handed over. The
# SDK has used ``httpx`` and, from 3.x, ``httpx2``; the raw stream surfaces either.
_STREAM_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError,)
with contextlib.suppress(ImportError):
    import httpx2 as _httpx2

    _STREAM_ERRORS += (_httpx2.HTTPError,)


def bound_history(history: Iterable[MessageRecord], max_tokens: int) -> list[MessageRecord]:
    """The newest whole turns of ``history`` that fit in ``max_tokens``, oldest first.

    Turns are dropped oldest first and never split, so the model never sees an answer
    without its question. Messages without text are left out.
    """
    turns = [
        [m for m in group if m.content and m.role in ("user", "assistant")]
        for _, group in groupby(history, key=lambda m: m.turn_id)
    ]
    kept: list[list[MessageRecord]] = []
    budget = max_tokens
    for turn in reversed(turns):
        cost = sum(len(m.content) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS for m in turn)
        if cost > budget:
            break
        budget -= cost
        kept.append(turn)
    return [message for turn in reversed(kept) for message in turn]


def build_messages(ctx: TurnContext) -> list[dict[str, Any]]:
    """System prompt, the bounded history, then this turn's user text."""
    messages: list[dict[str, Any]] = []
    if ctx.system_prompt:
        messages.append({"role": "system", "content": ctx.system_prompt})
    for record in bound_history(ctx.history, ctx.history_tokens):
        messages.append({"role": record.role, "content": record.content})
    messages.append({"role": "user", "content": ctx.user_text})
    return messages


@dataclass(slots=True)
class _StepResult:
    """What one model call left behind, for the turn (and a future tool loop)."""

    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False


class OpenAIRuntime:
    """The AgentRuntime for OpenAI-compatible endpoints."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        http_client: httpx2.AsyncClient | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
    ) -> None:
        """``http_client`` is the SDK's HTTP client type, owned by the caller (this
        runtime does not close it); ``max_retries`` applies before a response
        starts, never to a stream that broke mid-way."""
        self.base_url = base_url or OPENAI_BASE_URL
        self._api_key = api_key or PLACEHOLDER_API_KEY
        self._http_client = http_client
        self.timeout = timeout
        self.max_retries = max_retries
        self._sdk: openai.AsyncOpenAI | None = None

    async def startup(self) -> None:
        self._client()

    async def shutdown(self) -> None:
        sdk, self._sdk = self._sdk, None
        if sdk is not None and self._http_client is None:
            await sdk.close()

    def _client(self) -> openai.AsyncOpenAI:
        if self._sdk is None:
            self._sdk = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._api_key,
                timeout=self.timeout,
                max_retries=self.max_retries,
                http_client=self._http_client,
            )
        return self._sdk

    async def run(self, ctx: TurnContext) -> AsyncGenerator[RuntimeEvent, None]:
        messages = build_messages(ctx)
        step = _StepResult()
        async for event in self._model_step(ctx.model.name, messages, step):
            yield event
        # A tool loop goes here: while step.finish_reason == "tool_calls" and the
        # step budget allows, run the calls, append them to ``messages``, step again.
        if step.usage_reported:
            yield Usage(input_tokens=step.input_tokens, output_tokens=step.output_tokens)

    async def _model_step(
        self, model: str, messages: list[dict[str, Any]], step: _StepResult
    ) -> AsyncIterator[RuntimeEvent]:
        """One streamed model call; fills ``step`` as it goes."""
        request = self._client().chat.completions.with_streaming_response.create(
            model=model,
            messages=cast("list[ChatCompletionMessageParam]", messages),
            stream=True,
            stream_options={"include_usage": True},
        )
        done = False
        chunks = 0
        try:
            # The context manager closes the response on every exit, cancellation
            # included: the connection is dropped, not returned to the pool.
            async with request as response:
                yield StepStart()
                async for data in _sse_data(response.iter_lines()):
                    # Read on to the end of the body after [DONE]: a fully read
                    # response returns its connection to the pool for the next call.
                    if done:
                        continue
                    if data == "[DONE]":
                        done = True
                        continue
                    chunks += 1
                    for event in _chunk_events(_decode(data), step):
                        yield event
        except openai.APIStatusError as exc:
            raise ModelError(_status_message(exc)) from exc
        except openai.APITimeoutError as exc:
            raise ModelError(f"the model endpoint did not answer within {self.timeout:g}s") from exc
        except openai.APIConnectionError as exc:
            raise ModelError(
                f"could not reach the model endpoint {self.base_url}: {_cause(exc)}"
            ) from exc
        except openai.APIError as exc:
            raise ModelError(f"the model endpoint failed: {exc.message}") from exc
        except _STREAM_ERRORS as exc:
            raise ModelError(
                f"the model stream broke off after {chunks} chunks: {_describe(exc)}"
            ) from exc
        if not done and step.finish_reason is None:
            raise ModelError(f"the model stream ended early, after {chunks} chunks")
        yield StepFinish()


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event; comments and other fields skipped."""
    buffer: list[str] = []
    async for line in lines:
        if not line:
            if buffer:
                yield "\n".join(buffer)
                buffer.clear()
            continue
        name, _, value = line.partition(":")
        if name == "data":
            buffer.append(value.removeprefix(" "))
    if buffer:
        yield "\n".join(buffer)


def _decode(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ModelError(f"the model endpoint sent a malformed chunk: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise ModelError(f"the model endpoint sent a malformed chunk: {data[:200]!r}")
    error = chunk.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else error
        raise ModelError(f"the model endpoint reported an error mid-stream: {message}")
    return chunk


def _chunk_events(chunk: dict[str, Any], step: _StepResult) -> list[RuntimeEvent]:
    events: list[RuntimeEvent] = []
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        step.usage_reported = True
        step.input_tokens = int(usage.get("prompt_tokens") or 0)
        step.output_tokens = int(usage.get("completion_tokens") or 0)
    for choice in chunk.get("choices") or ():
        if choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta") or {}
        # vLLM and DeepSeek say ``reasoning_content``; OpenRouter and Ollama ``reasoning``.
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            events.append(ReasoningDelta(reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            events.append(TextDelta(content))
        if choice.get("finish_reason"):
            step.finish_reason = str(choice["finish_reason"])
    return events


def _status_message(exc: openai.APIStatusError) -> str:
    detail: Any = exc.body
    if isinstance(detail, dict):
        detail = detail.get("error", detail)
        if isinstance(detail, dict):
            detail = detail.get("message") or detail
    if not detail:
        detail = exc.message
    text = " ".join(str(detail).split())[:300]
    return f"the model endpoint answered HTTP {exc.status_code}: {text}"


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return _describe(cause) if cause is not None else str(exc)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
