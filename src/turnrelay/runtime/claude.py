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

Earlier turns reach the model as the CLI's own conversation: the session's
transcript (``turnrelay.transcript``), stored in object storage at each turn's
end (stripped of bookkeeping entries, a create-only write keyed on the turn's
seq and attempt), is written into the session's directory and resumed with
``--resume``; entries are mirrored to the store during the turn. A missing or
invalid transcript falls back to a fresh CLI session with the database history,
bounded by ``TURNRELAY_HISTORY_TOKENS``, as a section of the system prompt; a
transcript the CLI refuses is quarantined and the turn run once without it. That
section is stored with the new CLI session and given again on each of its resumes:
its transcript starts after those turns. The CLI session resumed is the one
whose compacted transcript is the store's newest (highest seq, then attempt);
the session row's record is the fallback: an attempt that wakes up after its
retry finished records its own, older one.

Events. Partial messages are on, so text and reasoning arrive as deltas and tool
arguments as ``input_json_delta`` pieces. Each model request starts a step; tool
results (from the CLI's tool-result messages) belong to the step that called the
tool. Usage comes from the final result. A failed model call (the CLI gives up
after its own retries and reports an error result), an SDK error or a CLI that
exits become ``ModelError`` / ``RuntimeFailure`` with one line of detail.

Tool approval. A call of one of turnrelay's tools that needs the user's approval
is held in the MCP handler, never run there; once the step's other running calls
are done, the CLI is interrupted: it writes the unanswered calls into its
transcript as stopped, then its result. The turn pauses (``Pause``) with the
calls held (and any the hold kept from running), and the attempt whose
transcript holds the pause. The continuation, a later attempt on any executor,
runs the approved calls (and the kept ones) once, resumes that transcript (a
``TranscriptStore`` reading ``through`` the pause's attempt, never a later
attempt's half) and tells the CLI in a user message how each call went; without
the transcript it starts a fresh session with the turn's message and that report.

Steering. A message the user sends with ``multitask: steer`` goes into the CLI's
streaming input while a step's tools run; the CLI hands a message that arrives
mid-turn to the model with the next tool results ("The user sent a new message
while you were working: …"). A PreToolUse hook holds each call until the turn
has seen it and written the step's messages, so they reach the CLI before the
call's result however fast the tool. A step that calls a tool needing approval
takes none (the CLI is stopped, which would drop them): they wait for the next
step, or become the next turn.

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
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
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
    SessionStore,
    StreamEvent,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
    create_sdk_mcp_server,
    project_key_for_directory,
)
from claude_agent_sdk.types import (
    HookContext,
    HookInput,
    SessionKey,
    SessionStoreEntry,
    SyncHookJSONOutput,
)

from turnrelay.errors import ConfigError, ModelError, RuntimeFailure, TurnrelayError
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
from turnrelay.runtime.confine import QUIET_ENV, check_sandbox, path_guard, write_launcher
from turnrelay.runtime.history import bound_history
from turnrelay.storage.base import ObjectStore
from turnrelay.tools.base import ToolContext, session_directory
from turnrelay.tools.registry import ToolOutcome, ToolRegistry
from turnrelay.transcript.store import TranscriptStore
from turnrelay.transcript.strip import STRIPPED, strip, transcript_problem

log = logging.getLogger(__name__)

MCP_SERVER = "turnrelay"
# How the CLI names the tools of an MCP server; the stream shows the bare name.
MCP_PREFIX = f"mcp__{MCP_SERVER}__"
# An interrupt is a control request the CLI answers at once; past this, closing
# its input and then signals end it anyway.
INTERRUPT_TIMEOUT = 2.0
# The project key of every stored transcript. The SDK's default (the working
# directory's path) would tie a session to one sandbox path; one chat session has
# one working directory anyway, and the transcript store is scoped to it.
STORED_PROJECT = "turnrelay"
# How long a tool call waits for the turn to see it (a call the chat never shows,
# a subagent's, goes on after this).
GATE_WAIT = 5.0
# Lines of the CLI's stderr kept for the message of a failed turn.
STDERR_LINES = 20
_TOOL_USE_ERROR = re.compile(r"</?tool_use_error>")
_SDK_INVALID = "Input validation error:"


class ClaudeRuntime:
    """The AgentRuntime that runs turns with the Claude Code CLI."""

    # The runner reads the session's recorded CLI session id for this runtime's
    # turns only (``TurnContext.cli_session_id``).
    resumes_cli_session = True

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
        objects: ObjectStore,
        strip_types: frozenset[str] = STRIPPED,
    ) -> None:
        """``sandbox_dir`` must be absolute and the same on every executor.
        ``cli_tools`` names the CLI's built-in tools to enable (none by default).
        ``cli_path``: the CLI to run (default: the one the SDK bundles).
        ``bwrap``: bubblewrap, to confine the CLI; required by ``Bash``.
        ``objects``: where the sessions' transcripts are stored; ``strip_types``: the
        transcript entry types dropped before they are stored."""
        self.sandbox_dir = sandbox_dir
        self.objects = objects
        self.strip_types = strip_types
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
        paused = ctx.resume.state if ctx.resume is not None else None
        transcripts = TranscriptStore(
            self.objects,
            user_id=ctx.user_id,
            session_id=ctx.session_id,
            seq=ctx.seq,
            attempt=ctx.attempt,
            # A continuation resumes the CLI's conversation as of its pause.
            through=int(paused["attempt"]) if paused is not None else None,
        )
        local = _Local(workdir, project_key_for_directory(workdir))
        resume, earlier = await self._materialise(ctx, transcripts, local)
        if resume is None:
            earlier = history_section(ctx)
            if paused is not None:
                log.warning(
                    "session %s: turn %s continues from its pause without the CLI's "
                    "transcript of it; the model is told the turn's message again",
                    ctx.session_id,
                    ctx.turn_id,
                )
        cli_id = resume or str(uuid.uuid4())
        prompt = ctx.user_text
        if paused is not None:
            # The held calls, answered: approved ones (and any the pause kept from
            # running) run now, once; the CLI is then told how each went.
            context = ToolContext(ctx.user_id, ctx.session_id, ctx.turn_id, workdir)
            report: list[str] = []
            async for event in self._answer_held(ctx, context, report):
                yield event
            yield StepFinish()
            prompt = continuation_prompt(report, None if resume is not None else ctx.user_text)
        try:
            try:
                async for event in self._turn(
                    ctx, workdir, transcripts, cli_id, resume, earlier, prompt
                ):
                    yield event
            except _ResumeRefused as refused:
                assert resume is not None
                # Kept for inspection, out of the way of every later turn.
                where = await transcripts.quarantine(_key(local, resume))
                log.warning(
                    "session %s: the CLI refused to resume %s (%s); transcript kept at %s, "
                    "running the turn once more as a fresh session with the stored history",
                    ctx.session_id,
                    resume,
                    refused.detail,
                    where,
                )
                cli_id, resume, earlier = str(uuid.uuid4()), None, history_section(ctx)
                if paused is not None:
                    prompt = continuation_prompt(report, ctx.user_text)
                async for event in self._turn(
                    ctx, workdir, transcripts, cli_id, None, earlier, prompt
                ):
                    yield event
        finally:
            # Also on a failure or a cancel: what the CLI wrote up to then is the
            # conversation the next turn continues, like the database's partial answer.
            saving = asyncio.ensure_future(self._save(ctx, transcripts, local, cli_id, earlier))
            try:
                await asyncio.shield(saving)
            except asyncio.CancelledError:
                saving.add_done_callback(_log_close_failure)
                raise

    async def _materialise(
        self, ctx: TurnContext, transcripts: TranscriptStore, local: _Local
    ) -> tuple[str | None, str]:
        """Write the session's stored transcript where the CLI resumes it from (inside
        the session's directory); the CLI session id to resume and the earlier turns
        it began with, or ``(None, "")`` for a fresh session (the database history
        then goes into the system prompt)."""
        # The store has the last word: an attempt that woke up after its retry
        # finished may have recorded its own (older) CLI session on the row.
        newest = await transcripts.newest_cli_session(STORED_PROJECT)
        if newest is not None and newest != ctx.cli_session_id:
            log.warning(
                "session %s: the newest stored transcript is CLI session %s's, not the "
                "recorded %s's (a stale attempt recorded it); resuming %s",
                ctx.session_id,
                newest,
                ctx.cli_session_id,
                newest,
            )
        cli = newest or ctx.cli_session_id
        if cli is None:
            return None, ""
        if not _is_uuid(cli):
            log.warning("session %s: recorded CLI session %r is not a UUID", ctx.session_id, cli)
            return None, ""
        data = await transcripts.load_bytes(_key(local, cli))
        if data is None:
            log.warning(
                "session %s: no stored transcript for CLI session %s; starting a fresh "
                "session with the database history",
                ctx.session_id,
                cli,
            )
            return None, ""
        problem = transcript_problem(data)
        if problem is not None:
            where = await transcripts.quarantine(_key(local, cli))
            log.warning(
                "session %s: stored transcript of CLI session %s is unusable (%s); kept at "
                "%s, starting a fresh session with the database history",
                ctx.session_id,
                cli,
                problem,
                where,
            )
            return None, ""
        path = local.transcript(cli)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return cli, await transcripts.history(_key(local, cli))

    async def _save(
        self,
        ctx: TurnContext,
        transcripts: TranscriptStore,
        local: _Local,
        cli_id: str,
        earlier: str,
    ) -> None:
        """Compact what the CLI wrote this turn into the store, and record its session
        (a new one with the earlier turns it began with)."""
        path = local.transcript(cli_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            log.info("session %s: the CLI wrote no transcript this turn", ctx.session_id)
            return
        problem = transcript_problem(data)
        if problem is not None:
            log.info("session %s: not storing this turn's transcript: %s", ctx.session_id, problem)
            return
        new = cli_id != ctx.cli_session_id
        try:
            if new and earlier:
                await transcripts.put_history(_key(local, cli_id), earlier)
            await transcripts.compact(_key(local, cli_id), strip(data, self.strip_types))
            if new and ctx.record_cli_session is not None:
                await ctx.record_cli_session(cli_id)
        except TurnrelayError as exc:
            log.warning("session %s: storing the transcript failed: %s", ctx.session_id, exc.detail)

    async def _turn(
        self,
        ctx: TurnContext,
        workdir: Path,
        transcripts: TranscriptStore,
        cli_id: str,
        resume: str | None,
        earlier: str,
        prompt: str,
    ) -> AsyncGenerator[RuntimeEvent, None]:
        """One CLI process running the turn from ``prompt``, the ``earlier`` turns
        in its system prompt; ``_ResumeRefused`` when it would not resume
        ``resume`` (before it produced anything). Ends with ``Pause`` when the
        model called a tool that needs the user's approval."""
        tool_context = ToolContext(ctx.user_id, ctx.session_id, ctx.turn_id, workdir)
        stderr: deque[str] = deque(maxlen=STDERR_LINES)
        holds = _Holds()
        gate = _StepGate()
        options = self._options(ctx, workdir, tool_context, stderr, holds, gate)
        options.session_store = _Mirror(transcripts)  # type: ignore[abstract]
        options.session_store_flush = "eager"
        options.system_prompt = system_prompt(ctx.system_prompt, earlier)
        if resume is not None:
            options.resume = resume
        else:
            options.session_id = cli_id
        client = ClaudeSDKClient(options)
        translator = _Translator(self.max_tool_steps + 1, self.tools.needs_approval)
        if ctx.resume is not None:
            translator.carried = _usage_of(ctx.resume.state.get("usage"))
        finished = False
        holding = asyncio.ensure_future(_stop_at_hold(client, holds, translator, tool_context))
        try:
            try:
                await client.connect()
                await client.query(prompt)
                steered: list[str] = []
                async for message in client.receive_response():
                    for event in translator.feed(message):
                        yield event
                    if translator.tools_started() and not translator.step_asks():
                        async for event in _steer(ctx, client, translator.requests + 1, steered):
                            yield event
                    if isinstance(message, AssistantMessage):
                        if translator.step_asks():
                            holds.seen.set()
                        await gate.release(translator.step_call_ids())
            except ClaudeSDKError as exc:
                failure = _failure(exc, stderr)
                if resume is not None and translator.silent:
                    raise _ResumeRefused(failure.detail) from exc
                raise failure from exc
            if holding.done():
                held = holding.result()  # raises if the CLI could not be stopped
                for call in held:
                    if call.approval_id is not None:
                        yield ApprovalRequest(call.id, call.approval_id, call.name, call.input)
                yield Pause(pause_state(ctx.attempt, cli_id, held, translator))
                finished = True
                return
            if resume is not None and translator.silent and translator.refused_resume():
                raise _ResumeRefused(translator.failure_detail())
            for event in translator.finish():
                yield event
            finished = True
        finally:
            holding.cancel()
            if not finished or holds.entered.is_set():
                tool_context.cancelled.set()  # a held call returns, unrun
            # Its own task: an anyio shield does not stop a second asyncio
            # cancellation, and an unfinished close would leave the CLI running.
            closing = asyncio.ensure_future(_close(client, interrupt=not finished))
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                closing.add_done_callback(_log_close_failure)
                raise

    def _options(
        self,
        ctx: TurnContext,
        workdir: Path,
        tool_context: ToolContext,
        stderr: deque[str],
        holds: _Holds,
        gate: _StepGate,
    ) -> ClaudeAgentOptions:
        own = [f"{MCP_PREFIX}{tool.name}" for tool in self.tools]
        servers: dict[str, Any] = {}
        if own:
            servers[MCP_SERVER] = self._mcp_server(tool_context, holds)
        if self._launcher is None:
            raise RuntimeFailure("the claude runtime was not started")
        hooks: dict[Any, list[HookMatcher]] = {}
        if self.cli_tools:
            # Fails closed: a hook that errors denies the call.
            hooks["PreToolUse"] = [HookMatcher(hooks=[path_guard(workdir)], on_failure="block")]
        if ctx.take_steers is not None:
            hooks.setdefault("PreToolUse", []).append(HookMatcher(hooks=[gate.hook]))
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
            system_prompt=ctx.system_prompt,
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

    def _mcp_server(self, context: ToolContext, holds: _Holds) -> Any:
        registry = self.tools

        def handler(name: str) -> Any:
            async def call(arguments: dict[str, Any]) -> dict[str, Any]:
                if registry.needs_approval(name, arguments):
                    # Held, never run here: the turn stops the CLI and pauses; the
                    # continuation runs it if the user approves. (It returns only
                    # once the CLI is stopped.)
                    holds.entered.set()
                    await context.cancelled.wait()
                    return _unrun(name)
                holds.running += 1
                holds.idle.clear()
                try:
                    outcome = await registry.call(name, arguments, context)
                finally:
                    holds.running -= 1
                    if holds.running == 0:
                        holds.idle.set()
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

    async def _answer_held(
        self, ctx: TurnContext, context: ToolContext, report: list[str]
    ) -> AsyncGenerator[RuntimeEvent, None]:
        """The paused turn's held calls, answered (``report`` gets a line for the
        model on each): an approved call runs, a denied one does not; a call the
        pause kept from running (it came after a held one) runs now."""
        assert ctx.resume is not None
        for held in ctx.resume.state["calls"]:
            call_id, name, approval_id = held["call_id"], held["name"], held["approval_id"]
            if approval_id is not None:
                approved, reason = ctx.resume.answers.get(
                    approval_id, (False, "the request was not answered")
                )
                yield ApprovalAnswered(call_id, approval_id, approved, reason)
                if not approved:
                    yield ToolDenied(call_id, reason)
                    why = f" ({reason})" if reason else ""
                    report.append(
                        f"I denied your call of {name!r} (id {call_id}){why}. It was not "
                        "run; do not call it again for this request."
                    )
                    continue
                how = "was held for my approval, and I approved it"
            else:
                how = "waited while another call was held for my approval"
            outcome = await self.tools.call(name, held["input"], context)
            yield (
                ToolResult(call_id, outcome.output)
                if outcome.ok
                else ToolFailed(call_id, outcome.error)
            )
            report.append(f"Your call of {name!r} (id {call_id}) {how}. {_ran(outcome)}")


def continuation_prompt(report: list[str], user_text: str | None) -> str:
    """What a paused turn's CLI is told when it goes on: how each held call went
    (its transcript shows them stopped), and without that transcript the turn's
    own message first."""
    answers = "[" + " ".join(report) + " Go on with my request.]"
    return answers if user_text is None else f"{user_text}\n\n{answers}"


def pause_state(
    attempt: int, cli_id: str, held: list[_Held], translator: _Translator
) -> dict[str, Any]:
    """What the continuation needs: the attempt whose transcript holds the
    pause, the calls held (or kept from running), and the usage so far."""
    return {
        "attempt": attempt,
        "cli_session": cli_id,
        "calls": [
            {
                "call_id": call.id,
                "name": call.name,
                "input": call.input,
                "approval_id": call.approval_id,
            }
            for call in held
        ],
        "usage": list(translator.usage_so_far()),
    }


def _ran(outcome: ToolOutcome) -> str:
    if outcome.ok:
        return f"It ran once and returned: {outcome.text}"
    return f"It ran once and failed: {outcome.text}"


def _unrun(name: str) -> dict[str, Any]:
    return {
        "content": [{"type": "text", "text": f"Tool {name!r} is waiting for the user's approval."}],
        "is_error": True,
    }


def _usage_of(value: Any) -> tuple[int, int]:
    if isinstance(value, list) and len(value) == 2:
        return int(value[0]), int(value[1])
    return 0, 0


@dataclass(slots=True)
class _Holds:
    """A hold's state: ``entered`` once an MCP handler holds a call that needs
    approval, ``seen`` once the turn has seen such a call (the handler can be
    entered before the turn reads the model's message), and the count of other
    calls still running (the CLI is stopped after them)."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    seen: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    running: int = 0

    def __post_init__(self) -> None:
        self.idle.set()


class _StepGate:
    """Holds each tool call (a PreToolUse hook) until the turn has seen the
    model's call and put the step's steering messages into the CLI's input.
    Written before the hook's answer, on the same pipe, they reach the CLI
    before the call's result: its next model request has them, however fast
    the tool."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._changed = asyncio.Condition()

    async def release(self, call_ids: Sequence[str]) -> None:
        async with self._changed:
            self._seen.update(call_ids)
            self._changed.notify_all()

    async def hook(
        self, event: HookInput, tool_use_id: str | None, context: HookContext
    ) -> SyncHookJSONOutput:
        if tool_use_id is not None:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: tool_use_id in self._seen), GATE_WAIT
                    )
        return {}  # no decision: the call goes on as it would have


@dataclass(frozen=True, slots=True)
class _Held:
    """A call of the paused step without a result: held for approval
    (``approval_id``), or kept from running behind a held one."""

    id: str
    name: str
    input: Any
    approval_id: str | None


async def _steer(
    ctx: TurnContext, client: ClaudeSDKClient, request: int, steered: list[str]
) -> AsyncGenerator[RuntimeEvent, None]:
    """The user's messages sent while the turn ran, into the CLI's streaming
    input while a step's tools run: the CLI gives a message that arrives
    mid-turn to the model with the next tool results ("The user sent a new
    message while you were working: …"), so model request ``request`` has it."""
    for steer in await new_steers(ctx, request, steered):
        await client.query(steer.text)
        yield SteerEntered(steer.message_id, steer.text)


async def _stop_at_hold(
    client: ClaudeSDKClient, holds: _Holds, translator: _Translator, context: ToolContext
) -> list[_Held]:
    """Once a call is held (and the step's running calls are done), stop the CLI
    (an interrupt: it writes the unanswered calls into its transcript as stopped,
    then its result) and answer the calls to continue from."""
    await holds.entered.wait()
    await holds.seen.wait()
    await holds.idle.wait()
    held = translator.hold()
    try:
        await asyncio.wait_for(client.interrupt(), INTERRUPT_TIMEOUT)
    except Exception as exc:
        context.cancelled.set()
        raise RuntimeFailure("the Claude Code CLI could not be stopped for an approval") from exc
    return held


def history_section(ctx: TurnContext) -> str:
    """The session's earlier turns (bounded) as system-prompt text; ``""`` if none."""
    earlier = bound_history(ctx.history, ctx.history_tokens)
    if not earlier:
        return ""
    lines = [
        "This conversation began before this message. Its earlier turns, oldest first:",
        "<conversation>",
    ]
    for record in earlier:
        lines += [f"<{record.role}>", record.content, f"</{record.role}>"]
    lines.append("</conversation>")
    return "\n".join(lines)


def system_prompt(configured: str, earlier: str) -> str:
    """The configured prompt, then the earlier turns' section, if any."""
    return f"{configured}\n\n{earlier}".strip() if earlier else configured


class _ResumeRefused(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class _Local:
    """Where the CLI keeps a session's transcripts on this executor's disk."""

    workdir: Path
    project_key: str  # the SDK's (and the CLI's) key for the working directory

    def transcript(self, cli_id: str) -> Path:
        if not _is_uuid(cli_id):
            raise RuntimeFailure(f"CLI session id {cli_id[:40]!r} is not a UUID")
        path = self.workdir / ".claude" / "projects" / self.project_key / f"{cli_id}.jsonl"
        resolved = path.resolve()
        if not resolved.is_relative_to(self.workdir.resolve()):
            raise RuntimeFailure(f"transcript path {resolved} is outside the session's directory")
        return resolved


def _key(local: _Local, cli_id: str) -> SessionKey:
    return {"project_key": STORED_PROJECT, "session_id": cli_id}


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


class _Mirror(SessionStore):
    """The transcript store as the SDK's mirror during a turn: the CLI's entries are
    appended as it writes them. ``load`` answers ``None`` because the runtime has
    already materialised the transcript inside the session's directory: the SDK's
    own materialiser writes into this process's temporary directory, outside the
    sandbox (and invisible to a CLI confined by bubblewrap)."""

    def __init__(self, store: TranscriptStore) -> None:
        self.store = store

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        await self.store.append({**key, "project_key": STORED_PROJECT}, entries)

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        return None


class _Translator:
    """CLI messages to runtime events, for one turn."""

    def __init__(
        self, max_turns: int, needs_approval: Callable[[str, Any], bool] | None = None
    ) -> None:
        self.max_turns = max_turns
        self.needs_approval = needs_approval
        self.carried = (0, 0)  # usage of the attempts before a pause
        self._step_calls: list[ToolUseBlock] = []  # of the step the model is in
        self._answered: set[str] = set()
        self._held: set[str] = set()  # calls whose stopped results stay out of the chat
        self.requests = 0  # model requests so far
        self._step_open = False  # a step whose tool results are not all in yet
        self.result: ResultMessage | None = None
        self.failure = ""  # the text of a synthetic error message
        self._streamed: set[str] = set()  # ids of model messages seen as deltas
        # Text streamed since the last message_start that no assistant message has
        # closed yet (None when no stream is open).
        self._open_text: str | None = None
        self._blocks: dict[int, str] = {}  # content block index -> tool call id
        self._calls: dict[str, str] = {}  # tool call id -> name as the CLI knows it
        self.silent = True  # no event yet

    def refused_resume(self) -> bool:
        """The CLI's result says it ended before the first model call (how it
        answers a ``--resume`` of a transcript it cannot read)."""
        result = self.result
        return (
            result is not None
            and result.is_error
            and result.subtype == "error_during_execution"
            and result.num_turns == 0
        )

    def failure_detail(self) -> str:
        result = self.result
        errors = "; ".join(result.errors or ()) if result is not None else ""
        return _one_line(errors or self.failure or "the CLI ended before the model call")

    def feed(self, message: Any) -> list[RuntimeEvent]:
        events = self._feed(message)
        if events:
            self.silent = False
        return events

    def _feed(self, message: Any) -> list[RuntimeEvent]:
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
            self._step_calls.clear()
            self._step_open = True
            self.requests += 1
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
                self._step_calls.append(block)
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
            if not isinstance(block, ToolResultBlock) or block.tool_use_id in self._held:
                continue
            self._answered.add(block.tool_use_id)
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

    def tools_started(self) -> bool:
        """True once per step, when the model's answer has called tools: the CLI
        runs them, then makes its next model request, with whatever reached its
        input meanwhile."""
        if not self._step_open or not self._step_calls:
            return False
        self._step_open = False
        return True

    def step_asks(self) -> bool:
        """A call of this step needs approval: the CLI will be stopped (which
        would drop a message in its input)."""
        return any(self._asks(block) for block in self._step_calls)

    def step_call_ids(self) -> list[str]:
        return [block.id for block in self._step_calls]

    def _asks(self, block: ToolUseBlock) -> bool:
        return (
            block.name.startswith(MCP_PREFIX)
            and self.needs_approval is not None
            and self.needs_approval(_shown_name(block.name), block.input)
        )

    def hold(self) -> list[_Held]:
        """The current step's calls without a result, as the pause keeps them:
        each of turnrelay's tools that needs approval gets a request, the others
        run in the continuation. Their stopped results stay out of the chat."""
        held: list[_Held] = []
        for block in self._step_calls:
            if block.id in self._answered:
                continue
            approval = f"approval_{uuid.uuid4().hex}" if self._asks(block) else None
            held.append(_Held(block.id, _shown_name(block.name), block.input, approval))
            self._held.add(block.id)
        return held

    def usage_so_far(self) -> tuple[int, int]:
        usage = (self.result.usage if self.result is not None else None) or {}
        return (
            self.carried[0] + _input_tokens(usage),
            self.carried[1] + int(usage.get("output_tokens") or 0),
        )

    def finish(self) -> list[RuntimeEvent]:
        result = self.result
        if result is None:
            raise RuntimeFailure("the Claude Code CLI ended the turn without a result")
        if result.is_error:
            if result.subtype == "error_max_turns":
                raise ModelError(f"the model kept calling tools past {self.max_turns} steps")
            detail = result.result or self.failure or "; ".join(result.errors or ())
            raise ModelError(_one_line(detail or f"the model call failed ({result.subtype})"))
        return [StepFinish(), Usage(*self.usage_so_far())]


def _input_tokens(usage: dict[str, Any]) -> int:
    return sum(
        int(usage.get(key) or 0)
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


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
