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
``TextDelta`` / ``ReasoningDelta`` / ``ToolInputStart`` / ``ToolInputDelta`` as they
arrive, then, when the model called tools, ``ToolCall`` and ``ToolResult`` or
``ToolFailed`` per call, then ``StepFinish``. With a tool registry the turn is a
bounded loop: while the model calls tools and fewer than ``max_tool_steps`` steps
ran tools, the calls run one after another (``ToolRegistry.call``: a failing tool is
a tool error the model reads, never the end of the turn) and the model steps
again; the step after the last allowed one is asked for an answer
(``tool_choice="none"``). The turn ends with one ``Usage`` summed over its steps,
when the endpoint reported usage.

A call of a tool that needs the user's approval (``ToolRegistry.needs_approval``)
is not run: it is shown (``ToolCall``), asked for (``ApprovalRequest``), and once
the step's other calls ran, the runtime yields ``Pause`` with the model messages
so far and ends. The attempt that continues the turn gets that state back with
the answers (``TurnContext.resume``): an approved call runs, a denied one
becomes a tool message saying so, and the loop goes on. Before every model
request the runtime takes the messages the user sent meanwhile with
``multitask: steer`` (``TurnContext.take_steers``) into the conversation, as
user messages (``SteerEntered``).
Every failure becomes a ``ModelError`` with a one-line message; on cancellation
the HTTP response is closed, so the endpoint sees the client go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai

from turnrelay.errors import ModelError
from turnrelay.runtime.base import (
    ApprovalAnswered,
    ApprovalRequest,
    Pause,
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
    TurnContext,
    Usage,
    new_steers,
)

# Re-exported: other runtimes bound their history with the same estimate.
from turnrelay.runtime.history import CHARS_PER_TOKEN as CHARS_PER_TOKEN
from turnrelay.runtime.history import MESSAGE_OVERHEAD_TOKENS as MESSAGE_OVERHEAD_TOKENS
from turnrelay.runtime.history import bound_history as bound_history
from turnrelay.tools.base import ToolContext, session_directory
from turnrelay.tools.registry import ToolOutcome, ToolRegistry

if TYPE_CHECKING:
    import httpx2

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Local servers ignore the key, but the SDK refuses to build a client without one.
PLACEHOLDER_API_KEY = "unused"
# Tool-calling steps in one turn before the model is asked to answer without tools.
DEFAULT_MAX_TOOL_STEPS = 8

# Errors of the HTTP library while reading a body the SDK already handed over. The
# SDK has used ``httpx`` and, from 3.x, ``httpx2``; the raw stream surfaces either.
_STREAM_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError,)
with contextlib.suppress(ImportError):
    import httpx2 as _httpx2

    _STREAM_ERRORS += (_httpx2.HTTPError,)


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
class _Call:
    """A tool call as it streams in: ``arguments`` arrive in pieces."""

    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _StepResult:
    """What one model call left behind, for the turn and its tool loop."""

    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    text: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)


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
        tools: ToolRegistry | None = None,
        sandbox_dir: Path | None = None,
        max_tool_steps: int = DEFAULT_MAX_TOOL_STEPS,
    ) -> None:
        """``http_client`` is the SDK's HTTP client type, owned by the caller (this
        runtime does not close it); ``max_retries`` applies before a response
        starts, never to a stream that broke mid-way. ``tools`` are offered as
        functions; ``sandbox_dir`` holds the sessions' working directories (see
        ``session_directory``), which tools may read."""
        self.base_url = base_url or OPENAI_BASE_URL
        self.tools = tools if tools is not None and len(tools) else None
        self.sandbox_dir = sandbox_dir
        self.max_tool_steps = max_tool_steps
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
                http_client=self._http_client or _aiohttp_client(),
            )
        return self._sdk

    async def run(self, ctx: TurnContext) -> AsyncGenerator[RuntimeEvent, None]:
        functions = _functions(self.tools) if self.tools is not None else None
        tool_context = self._tool_context(ctx)
        usage = _StepResult()
        tool_steps = 0
        requests = 0  # model requests so far (steering counts them from 1)
        steered: list[str] = []  # the steering messages' ids, inserted once each
        try:
            if ctx.resume is None:
                messages = build_messages(ctx)
            else:
                # A paused turn goes on where it stopped: the held calls are
                # answered (run, or denied), then the model steps again.
                state = ctx.resume.state
                messages = list(state["messages"])
                tool_steps = int(state["tool_steps"])
                requests = int(state.get("requests", 0))
                steered = list(state.get("steered", []))
                usage.usage_reported = bool(state["usage"]["reported"])
                usage.input_tokens = int(state["usage"]["input"])
                usage.output_tokens = int(state["usage"]["output"])
                for waiting in state["held"]:
                    async for event in self._answer(waiting, ctx, tool_context, messages):
                        yield event
                yield StepFinish()
            while True:
                step = _StepResult()
                # Past the budget, tools stay declared (the history holds calls of
                # them) but the model is asked to answer.
                choice = None if functions is None or tool_steps < self.max_tool_steps else "none"
                requests += 1
                async for event in self._steers(ctx, requests, messages, steered):
                    yield event
                async for event in self._model_step(
                    ctx.model.name, messages, step, functions, choice
                ):
                    yield event
                usage.usage_reported |= step.usage_reported
                usage.input_tokens += step.input_tokens
                usage.output_tokens += step.output_tokens
                if not step.calls or choice == "none":
                    yield StepFinish()
                    break
                tool_steps += 1
                calls = [step.calls[i] for i in sorted(step.calls)]
                messages.append(_assistant_message(step, calls))
                held: list[dict[str, Any]] = []
                for call in calls:
                    raw = "".join(call.arguments)
                    if self.tools is not None and self.tools.needs_approval(call.name, raw):
                        held.append(_hold(call, raw))
                        yield ToolCall(call.id, call.name, _shown(raw))
                        yield ApprovalRequest(
                            call.id, held[-1]["approval_id"], call.name, _shown(raw)
                        )
                        continue
                    async for event in self._run_call(
                        call.id, call.name, raw, tool_context, messages
                    ):
                        yield event
                if held:
                    yield Pause(
                        {
                            "messages": messages,
                            "tool_steps": tool_steps,
                            "requests": requests,
                            "steered": steered,
                            "usage": {
                                "reported": usage.usage_reported,
                                "input": usage.input_tokens,
                                "output": usage.output_tokens,
                            },
                            "held": held,
                        }
                    )
                    return
                yield StepFinish()
        except asyncio.CancelledError:
            tool_context.cancelled.set()
            raise
        if usage.usage_reported:
            yield Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)

    async def _steers(
        self, ctx: TurnContext, request: int, messages: list[dict[str, Any]], steered: list[str]
    ) -> AsyncIterator[RuntimeEvent]:
        """The user's messages sent while the turn ran, into the next request."""
        for steer in await new_steers(ctx, request, steered):
            messages.append({"role": "user", "content": steer.text})
            yield SteerEntered(steer.message_id, steer.text)

    def _tool_context(self, ctx: TurnContext) -> ToolContext:
        workdir = session_directory(self.sandbox_dir, ctx.session_id) if self.sandbox_dir else None
        return ToolContext(ctx.user_id, ctx.session_id, ctx.turn_id, workdir)

    async def _answer(
        self,
        held: dict[str, Any],
        ctx: TurnContext,
        context: ToolContext,
        messages: list[dict[str, Any]],
    ) -> AsyncIterator[RuntimeEvent]:
        """A held call, answered: run it when approved, else tell the model it was denied."""
        assert ctx.resume is not None
        call_id, name = held["call_id"], held["name"]
        approved, reason = ctx.resume.answers.get(
            held["approval_id"], (False, "the request was not answered")
        )
        yield ApprovalAnswered(call_id, held["approval_id"], approved, reason)
        if not approved:
            yield ToolDenied(call_id, reason)
            why = f": {reason}" if reason else ""
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": f"The user denied this call of {name!r}{why}. It was not run; "
                    "do not call it again for this request.",
                }
            )
            return
        async for event in self._run_call(
            call_id, name, held["arguments"], context, messages, shown=True
        ):
            yield event

    async def _run_call(
        self,
        call_id: str,
        name: str,
        raw: str,
        context: ToolContext,
        messages: list[dict[str, Any]],
        *,
        shown: bool = False,
    ) -> AsyncIterator[RuntimeEvent]:
        """Run one call: ``ToolCall`` (unless ``shown`` already), then its
        ``ToolResult`` or ``ToolFailed``; the model's next request gets the outcome."""
        if not shown:
            yield ToolCall(call_id, name, _shown(raw))
        if self.tools is None:
            outcome = ToolOutcome(False, error=f"No tools are offered; {name!r} is unknown.")
        else:
            outcome = await self.tools.call(name, raw, context)
        yield (
            ToolResult(call_id, outcome.output)
            if outcome.ok
            else ToolFailed(call_id, outcome.error)
        )
        messages.append({"role": "tool", "tool_call_id": call_id, "content": outcome.text})

    async def _model_step(
        self,
        model: str,
        messages: list[dict[str, Any]],
        step: _StepResult,
        functions: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
    ) -> AsyncIterator[RuntimeEvent]:
        """One streamed model call; fills ``step`` as it goes. Ends without
        ``StepFinish``: the caller runs the step's tool calls first."""
        # The messages and tools are already the request's JSON (plain dicts of
        # strings this runtime built), so they ride in ``extra_body``, which the
        # SDK merges into the body as it is: its typed transform of ``messages``
        # and ``tools`` would give the same JSON for 0.3-0.5 ms of CPU per
        # request, a twentieth of a turn's whole cost (``BENCHMARKS.md``).
        body: dict[str, Any] = {"messages": messages}
        if functions is not None:
            body["tools"] = functions
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        request = self._client().chat.completions.with_streaming_response.create(
            model=model,
            messages=[],  # replaced by extra_body's
            stream=True,
            stream_options={"include_usage": True},
            extra_body=body,
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
        except openai.APIConnectionError as exc:  # APITimeoutError included
            refused = _refused(exc)
            if isinstance(exc, openai.APITimeoutError) and refused is None:
                raise ModelError(
                    f"the model endpoint did not answer within {self.timeout:g}s"
                ) from exc
            raise ModelError(
                f"could not reach the model endpoint {self.base_url}: "
                f"{_describe(refused) if refused is not None else _cause(exc)}"
            ) from exc
        except openai.APIError as exc:
            raise ModelError(f"the model endpoint failed: {exc.message}") from exc
        except _STREAM_ERRORS as exc:
            raise ModelError(
                f"the model stream broke off after {chunks} chunks: {_describe(exc)}"
            ) from exc
        if not done and step.finish_reason is None:
            raise ModelError(f"the model stream ended early, after {chunks} chunks")


def _shown(raw: str) -> Any:
    """A call's arguments as the stream shows them: the JSON value, else the text."""
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return raw


def _hold(call: _Call, raw: str) -> dict[str, Any]:
    return {
        "call_id": call.id,
        "name": call.name,
        "arguments": raw,
        "approval_id": f"approval_{uuid.uuid4().hex}",
    }


def _functions(tools: ToolRegistry) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": name, "description": description, "parameters": schema},
        }
        for name, description, schema in tools.schemas()
    ]


def _assistant_message(step: _StepResult, calls: list[_Call]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": "".join(step.text) or None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": "".join(call.arguments)},
            }
            for call in calls
        ],
    }


def _aiohttp_client() -> httpx2.AsyncClient | None:
    """The SDK's aiohttp transport, which its docs name for concurrency: reading
    a model's stream through it costs a fraction of the CPU of the default
    httpx transport (anyio checkpoints and a cancel scope per read), the largest
    cost of relaying many turns at once (``BENCHMARKS.md``). Kept off where a
    proxy is configured (aiohttp does not read ``HTTPS_PROXY`` and the like;
    the default client does) or aiohttp is missing: ``None``, the SDK's default.
    The SDK closes the client with itself."""
    if urllib.request.getproxies():
        return None
    try:
        import aiohttp  # noqa: F401  (the SDK's client needs it)
        from openai import DefaultAioHttpClient
    except ImportError:
        return None
    client: httpx2.AsyncClient = DefaultAioHttpClient()
    return client


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
            step.text.append(content)
            events.append(TextDelta(content))
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            _tool_call_events(tool_calls, step, events)
        if choice.get("finish_reason"):
            step.finish_reason = str(choice["finish_reason"])
    return events


def _tool_call_events(
    tool_calls: list[dict[str, Any]], step: _StepResult, events: list[RuntimeEvent]
) -> None:
    """Tool call pieces: the first of a call names it (and has its id, where the
    server gives one); the rest add to its arguments."""
    for piece in tool_calls:
        if not isinstance(piece, dict):
            continue
        index = int(piece.get("index") or 0)
        function = piece.get("function") or {}
        call = step.calls.get(index)
        if call is None:
            call_id = str(piece.get("id") or f"call_{uuid.uuid4().hex}")
            call = _Call(call_id, str(function.get("name") or ""))
            step.calls[index] = call
            events.append(ToolInputStart(call.id, call.name))
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            call.arguments.append(arguments)
            events.append(ToolInputDelta(call.id, arguments))


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


def _refused(exc: BaseException) -> OSError | None:
    """The socket error (refused, unreachable, reset) under an SDK error, if one
    is. The SDK's aiohttp transport reports a refused connection as a connect
    *timeout* (its exception map ranks aiohttp's ClientConnectionError first), so
    the cause chain, not the SDK's type, says which it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return _describe(cause) if cause is not None else str(exc)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
