"""Runtime ``claude``: each turn is run by the Claude Code CLI, through ``claude-agent-sdk``.

The SDK's wheel bundles the CLI. A turn is one ``ClaudeSDKClient`` (one CLI
process) working in the session's directory under the sandbox base (created for
the turn; ``session_directory`` keeps it inside the base), which is also the CLI's
``HOME``, with ``CLAUDE_CONFIG_DIR`` at ``<session dir>/.claude`` and ``TMPDIR``
at ``<session dir>/.tmp``. The CLI talks to ``ANTHROPIC_BASE_URL`` with
``ANTHROPIC_API_KEY`` or ``ANTHROPIC_AUTH_TOKEN``, so Anthropic, OpenRouter and
gateways all work; the composition root reads them and passes them in, this
module never reads the environment.

Confined to its session (``confine.py``). The CLI is started through a launcher
that hands it an allow-listed environment (what it needs to run and reach the
model; no database, broker, cloud or other provider secrets) and, where
bubblewrap works, runs it in its own namespaces: the system read-only, the
session's directory the only writable place, no other session's directory, and
only its own processes in ``/proc``. A PreToolUse hook denies the CLI's file
tools any path that resolves outside the session's directory. ``Bash`` (or any
built-in that can run commands) is refused at startup where bubblewrap does not
work. What the sandbox cannot hide from a command run by ``Bash``: the model
credentials the CLI itself holds (``ANTHROPIC_*``), and the network.

Safe by default. ``tools=[]`` removes the CLI's built-in tools (Bash, Read, Edit,
WebFetch, …): a model that asks for one gets "No such tool available" as a tool
error. ``allowed_tools`` only pre-approves, so it lists just turnrelay's tools
(offered through an in-process MCP server, run by ``ToolRegistry.call`` like in
every runtime) and the built-ins that settings enable by name. The permission
mode ``dontAsk`` denies whatever is not pre-approved rather than prompting, and
no settings, hooks or ``CLAUDE.md`` are loaded from disk (``setting_sources=[]``):
the working directory holds user data, never configuration. The prompt is
delivered verbatim: no ``@path`` expansion or slash commands from user text.

Until transcripts are stored, the session's earlier turns come from the database,
bounded by ``TURNRELAY_HISTORY_TOKENS``, as a section of the system prompt; the
user message stays this turn's text alone.

Events. Partial messages are on, so text and reasoning arrive as deltas and tool
arguments as ``input_json_delta`` pieces. Each model request starts a step; tool
results (from the CLI's tool-result messages) belong to the step that called the
tool. Usage comes from the final result. A failed model call (the CLI gives up
after its own retries and reports an error result), an SDK error or a CLI that
exits become ``ModelError`` / ``RuntimeFailure`` with one line of detail.

Cancellation interrupts the CLI (which closes its model request), then closes its
input and waits for it to exit, terminating and then killing it if it does not.
That cleanup runs in its own task, shielded, so a second cancellation cannot leave
a CLI process behind. While the CLI is silent (a long tool, a slow model) the SSE
stream stays alive through the API's heartbeat comments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    CLIConnectionError,
    CLIJSONDecodeError,
    CLINotFoundError,
    HookMatcher,
    ProcessError,
    ResultMessage,
    SdkMcpTool,
    StreamEvent,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
    create_sdk_mcp_server,
)

from turnrelay.errors import ConfigError, ModelError, RuntimeFailure
from turnrelay.runtime.base import (
    ReasoningDelta,
    RuntimeEvent,
    StepFinish,
    StepStart,
    TextDelta,
    ToolCall,
    ToolFailed,
    ToolInputDelta,
    ToolInputStart,
    ToolResult,
    TurnContext,
    Usage,
)
from turnrelay.runtime.confine import QUIET_ENV, check_sandbox, path_guard, write_launcher
from turnrelay.runtime.history import bound_history
from turnrelay.tools.base import ToolContext, session_directory
from turnrelay.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

MCP_SERVER = "turnrelay"
# How the CLI names the tools of an MCP server; the stream shows the bare name.
MCP_PREFIX = f"mcp__{MCP_SERVER}__"
# An interrupt is a control request the CLI answers at once; past this, closing
# its input and then signals end it anyway.
INTERRUPT_TIMEOUT = 2.0
# Lines of the CLI's stderr kept for the message of a failed turn.
STDERR_LINES = 20
_TOOL_USE_ERROR = re.compile(r"</?tool_use_error>")
_SDK_INVALID = "Input validation error:"


class ClaudeRuntime:
    """The AgentRuntime that runs turns with the Claude Code CLI."""

    def __init__(
        self,
        *,
        sandbox_dir: Path,
        tools: ToolRegistry | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        auth_token: str | None = None,
        cli_tools: Sequence[str] = (),
        max_tool_steps: int = 8,
        cli_path: str | None = None,
        bwrap: str | None = None,
    ) -> None:
        """``sandbox_dir`` must be absolute and the same on every executor.
        ``cli_tools`` names the CLI's built-in tools to enable (none by default).
        ``cli_path``: the CLI to run (default: the one the SDK bundles).
        ``bwrap``: bubblewrap, to confine the CLI; required by ``Bash``."""
        self.sandbox_dir = sandbox_dir
        self.tools = tools if tools is not None else ToolRegistry()
        self.cli_tools = list(cli_tools)
        self.max_tool_steps = max_tool_steps
        self.cli_path = cli_path
        self.bwrap = bwrap
        self.confined = False  # set by startup(): whether bwrap works here
        self._launcher_dir: Path | None = None
        self._launcher: Path | None = None
        self.env = dict(QUIET_ENV)
        for name, value in (
            ("ANTHROPIC_BASE_URL", base_url),
            ("ANTHROPIC_API_KEY", api_key),
            ("ANTHROPIC_AUTH_TOKEN", auth_token),
        ):
            if value:
                self.env[name] = value

    async def startup(self) -> None:
        self.sandbox_dir.mkdir(parents=True, exist_ok=True)
        cli = self.cli_path or _bundled_cli()
        self.confined = await check_sandbox(
            self.bwrap, cli=cli, sandbox=self.sandbox_dir, tools=self.cli_tools
        )
        if not self.confined:
            log.warning(
                "bubblewrap does not work here: the Claude Code CLI runs with an "
                "allow-listed environment but without a private view of the filesystem"
            )
        # Outside the sandbox: no session can see or change it.
        self._launcher_dir = Path(tempfile.mkdtemp(prefix="turnrelay-claude-"))
        self._launcher = write_launcher(
            self._launcher_dir,
            cli=cli,
            bwrap=self.bwrap if self.confined else None,
            sandbox=self.sandbox_dir,
        )

    async def shutdown(self) -> None:
        # Every turn owns its CLI process and ends it; only the launcher is left.
        if self._launcher_dir is not None:
            shutil.rmtree(self._launcher_dir, ignore_errors=True)
            self._launcher_dir = self._launcher = None

    async def run(self, ctx: TurnContext) -> AsyncGenerator[RuntimeEvent, None]:
        workdir = session_directory(self.sandbox_dir, ctx.session_id)
        workdir.mkdir(parents=True, exist_ok=True)
        tool_context = ToolContext(ctx.user_id, ctx.session_id, ctx.turn_id, workdir)
        stderr: deque[str] = deque(maxlen=STDERR_LINES)
        client = ClaudeSDKClient(self._options(ctx, workdir, tool_context, stderr))
        translator = _Translator(self.max_tool_steps + 1)
        finished = False
        try:
            try:
                await client.connect()
                await client.query(ctx.user_text)
                async for message in client.receive_response():
                    for event in translator.feed(message):
                        yield event
            except ClaudeSDKError as exc:
                raise _failure(exc, stderr) from exc
            for event in translator.finish():
                yield event
            finished = True
        finally:
            if not finished:
                tool_context.cancelled.set()
            # Its own task: an anyio shield does not stop a second asyncio
            # cancellation, and an unfinished close would leave the CLI running.
            closing = asyncio.ensure_future(_close(client, interrupt=not finished))
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                closing.add_done_callback(_log_close_failure)
                raise

    def _options(
        self, ctx: TurnContext, workdir: Path, tool_context: ToolContext, stderr: deque[str]
    ) -> ClaudeAgentOptions:
        own = [f"{MCP_PREFIX}{tool.name}" for tool in self.tools]
        servers: dict[str, Any] = {}
        if own:
            servers[MCP_SERVER] = self._mcp_server(tool_context)
        if self._launcher is None:
            raise RuntimeFailure("the claude runtime was not started")
        hooks: dict[Any, list[HookMatcher]] = {}
        if self.cli_tools:
            # Fails closed: a hook that errors denies the call.
            hooks["PreToolUse"] = [HookMatcher(hooks=[path_guard(workdir)], on_failure="block")]
        # The session's directory is the CLI's home, configuration and scratch.
        scratch = workdir / ".tmp"
        scratch.mkdir(exist_ok=True)
        env = {
            **self.env,
            "HOME": str(workdir),
            "CLAUDE_CONFIG_DIR": str(workdir / ".claude"),
            "TMPDIR": str(scratch),
        }
        return ClaudeAgentOptions(
            tools=list(self.cli_tools),
            allowed_tools=own + self.cli_tools,
            mcp_servers=servers,
            strict_mcp_config=True,
            permission_mode="dontAsk",
            setting_sources=[],
            system_prompt=system_prompt(ctx),
            model=ctx.model.name,
            cwd=str(workdir),
            env=env,
            hooks=hooks or None,
            include_partial_messages=True,
            verbatim_prompts=True,
            max_turns=self.max_tool_steps + 1,
            cli_path=str(self._launcher),
            stderr=stderr.append,
        )

    def _mcp_server(self, context: ToolContext) -> Any:
        registry = self.tools

        def handler(name: str) -> Any:
            async def call(arguments: dict[str, Any]) -> dict[str, Any]:
                outcome = await registry.call(name, arguments, context)
                return {
                    "content": [{"type": "text", "text": outcome.text}],
                    "is_error": not outcome.ok,
                }

            return call

        tools = [
            SdkMcpTool(
                name=name, description=description, input_schema=schema, handler=handler(name)
            )
            for name, description, schema in registry.schemas()
        ]
        return create_sdk_mcp_server(MCP_SERVER, tools=tools)


def system_prompt(ctx: TurnContext) -> str:
    """The configured prompt, then the session's earlier turns (bounded), if any."""
    earlier = bound_history(ctx.history, ctx.history_tokens)
    if not earlier:
        return ctx.system_prompt
    lines = [
        ctx.system_prompt,
        "",
        "This conversation began before this message. Its earlier turns, oldest first:",
        "<conversation>",
    ]
    for record in earlier:
        lines += [f"<{record.role}>", record.content, f"</{record.role}>"]
    lines.append("</conversation>")
    return "\n".join(lines).strip()


class _Translator:
    """CLI messages to runtime events, for one turn."""

    def __init__(self, max_turns: int) -> None:
        self.max_turns = max_turns
        self.result: ResultMessage | None = None
        self.failure = ""  # the text of a synthetic error message
        self._streamed: set[str] = set()  # ids of model messages seen as deltas
        # Text streamed since the last message_start that no assistant message has
        # closed yet (None when no stream is open).
        self._open_text: str | None = None
        self._blocks: dict[int, str] = {}  # content block index -> tool call id
        self._calls: dict[str, str] = {}  # tool call id -> name as the CLI knows it

    def feed(self, message: Any) -> list[RuntimeEvent]:
        # Messages of subagents (parent_tool_use_id set) stay out of the chat.
        if getattr(message, "parent_tool_use_id", None) is not None:
            return []
        if isinstance(message, StreamEvent):
            return self._stream_event(message.event)
        if isinstance(message, AssistantMessage):
            return self._assistant(message)
        if isinstance(message, UserMessage):
            return self._tool_results(message)
        if isinstance(message, ResultMessage):
            self.result = message
        return []

    def _stream_event(self, event: dict[str, Any]) -> list[RuntimeEvent]:
        kind = event.get("type")
        if kind == "message_start":
            self._streamed.add(str((event.get("message") or {}).get("id")))
            self._open_text = ""
            self._blocks.clear()
            return [StepStart()]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                call_id, name = str(block.get("id")), str(block.get("name"))
                self._blocks[int(event.get("index") or 0)] = call_id
                self._calls[call_id] = name
                return [ToolInputStart(call_id, _shown_name(name))]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            match delta.get("type"):
                case "text_delta" if delta.get("text"):
                    if self._open_text is not None:
                        self._open_text += str(delta["text"])
                    return [TextDelta(str(delta["text"]))]
                case "thinking_delta" if delta.get("thinking"):
                    return [ReasoningDelta(str(delta["thinking"]))]
                case "input_json_delta" if delta.get("partial_json"):
                    target = self._blocks.get(int(event.get("index") or 0))
                    if target is not None:
                        return [ToolInputDelta(target, str(delta["partial_json"]))]
        return []

    def _assistant(self, message: AssistantMessage) -> list[RuntimeEvent]:
        if message.error is not None:
            # The CLI's own account of a failed model call; the result follows.
            self.failure = " ".join(b.text for b in message.content if isinstance(b, TextBlock))
            return []
        streamed = message.message_id is not None and message.message_id in self._streamed
        events: list[RuntimeEvent] = []
        if not streamed and self._open_text is not None:
            # A streamed step closed by a message of another id: the CLI gave up on the
            # stream (a stall) and fetched the step again without streaming. What was
            # streamed is already shown; only text beyond it is new.
            streamed = True
            if message.message_id is not None:
                self._streamed.add(message.message_id)
            whole = "".join(b.text for b in message.content if isinstance(b, TextBlock))
            if whole.startswith(self._open_text) and len(whole) > len(self._open_text):
                events.append(TextDelta(whole[len(self._open_text) :]))
        self._open_text = None
        for block in message.content:
            if isinstance(block, ToolUseBlock):
                self._calls[block.id] = block.name
                events.append(ToolCall(block.id, _shown_name(block.name), block.input))
            elif streamed:
                continue
            elif isinstance(block, TextBlock) and block.text:
                events.append(TextDelta(block.text))
            elif isinstance(block, ThinkingBlock) and block.thinking:
                events.append(ReasoningDelta(block.thinking))
        return events

    def _tool_results(self, message: UserMessage) -> list[RuntimeEvent]:
        if not isinstance(message.content, list):
            return []
        events: list[RuntimeEvent] = []
        for block in message.content:
            if not isinstance(block, ToolResultBlock):
                continue
            text = _result_text(block.content)
            if block.is_error:
                error = _TOOL_USE_ERROR.sub("", text).strip()
                name = self._calls.get(block.tool_use_id, "")
                if name.startswith(MCP_PREFIX) and error.startswith(_SDK_INVALID):
                    # The SDK checks arguments against the schema before the registry
                    # sees them; name the tool, as the registry's message would.
                    detail = error.removeprefix(_SDK_INVALID).strip()
                    error = f"Invalid arguments for tool {_shown_name(name)!r}: {detail}"
                events.append(ToolFailed(block.tool_use_id, error))
            elif self._calls.get(block.tool_use_id, "").startswith(MCP_PREFIX):
                events.append(ToolResult(block.tool_use_id, _decoded(text)))
            else:
                events.append(ToolResult(block.tool_use_id, text))
        return events

    def finish(self) -> list[RuntimeEvent]:
        result = self.result
        if result is None:
            raise RuntimeFailure("the Claude Code CLI ended the turn without a result")
        if result.is_error:
            if result.subtype == "error_max_turns":
                raise ModelError(f"the model kept calling tools past {self.max_turns} steps")
            detail = result.result or self.failure or "; ".join(result.errors or ())
            raise ModelError(_one_line(detail or f"the model call failed ({result.subtype})"))
        events: list[RuntimeEvent] = [StepFinish()]
        usage = result.usage or {}
        input_tokens = sum(
            int(usage.get(key) or 0)
            for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        events.append(Usage(input_tokens, int(usage.get("output_tokens") or 0)))
        return events


def _bundled_cli() -> str:
    """The CLI that the SDK's wheel bundles, else a ``claude`` on PATH."""
    import claude_agent_sdk

    bundled = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    if bundled.is_file():
        return str(bundled)
    found = shutil.which("claude")
    if found is None:
        raise ConfigError(
            "the Claude Code CLI was not found: the claude-agent-sdk wheel for this "
            "platform bundles it (pip install 'turnrelay[claude]')"
        )
    return found


def _shown_name(name: str) -> str:
    return name.removeprefix(MCP_PREFIX)


def _result_text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", "")) for part in content if part.get("type") == "text"
        )
    return ""


def _decoded(text: str) -> Any:
    """A turnrelay tool's output as the tool gave it (its text is JSON unless a string)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


def _failure(exc: ClaudeSDKError, stderr: deque[str]) -> RuntimeFailure:
    tail = _one_line(" | ".join(stderr), 300)
    if isinstance(exc, CLINotFoundError):
        return RuntimeFailure(f"the Claude Code CLI was not found: {exc}")
    if isinstance(exc, CLIConnectionError):
        return RuntimeFailure(_one_line(f"could not run the Claude Code CLI: {exc}"))
    if isinstance(exc, ProcessError):
        detail = f"the Claude Code CLI failed (exit code {exc.exit_code})"
        return ModelError(f"{detail}: {tail}" if tail else detail)
    if isinstance(exc, CLIJSONDecodeError):
        return RuntimeFailure("the Claude Code CLI sent output that is not JSON")
    return RuntimeFailure(_one_line(f"the Claude Code CLI failed: {exc}"))


async def _close(client: ClaudeSDKClient, *, interrupt: bool) -> None:
    """Stop the model call if the turn did not finish, then end the CLI process."""
    if interrupt:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.interrupt(), INTERRUPT_TIMEOUT)
    await client.disconnect()


def _log_close_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing the Claude Code CLI failed", exc_info=task.exception())
