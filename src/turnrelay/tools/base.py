"""The Tool protocol: what every tool offered to a model is.

A tool has a ``name`` the model calls it by, a ``description`` the model reads,
an ``args_model`` (a pydantic model: its JSON Schema is what the model sees, and
it validates what the model sends) and ``async run(args, context)``. ``run``
returns a string or any JSON-serialisable value; the model receives it as text
(JSON for anything but a string) and the chat stream shows it as the tool's
output.

A tool that cannot do what was asked raises ``ToolError`` with a message for the
model. Any other exception is a failure of the tool; either way the model sees a
tool error and the turn goes on (see ``ToolRegistry.call``). Tools run inside the
turn: a cancelled turn cancels them (``asyncio.CancelledError``), and
``context.cancelled`` is set for work that a cancellation cannot reach (a thread,
a child process).

Tools may run again when a turn is retried on another executor: side effects are
at-least-once.

A tool that acts for the user (sends, writes, deletes) can ask for the user's
approval before it runs: ``needs_approval = True``, or a function of the
validated arguments that says whether this call needs it. Such a call is held
back and the turn waits (``ToolRegistry.needs_approval``); the
``TURNRELAY_TOOLS_REQUIRING_APPROVAL`` setting asks it of named tools too.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from turnrelay.errors import RuntimeFailure

# What providers accept as a function name (OpenAI and Anthropic agree on this).
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_UNSAFE_ID_CHARS = re.compile(r"[^0-9a-zA-Z_-]")


class ToolError(RuntimeFailure):
    """Raised by a tool: the message is what the model reads as the tool's error."""

    code = "tool_error"


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Who a tool runs for, where, and whether the turn is still wanted."""

    user_id: str
    session_id: str
    turn_id: str
    # The session's working directory under the sandbox base (see
    # ``session_directory``); it may not exist yet.
    workdir: Path | None = None
    # Set when the turn is cancelled.
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise asyncio.CancelledError


@runtime_checkable
class Tool(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def args_model(self) -> type[BaseModel]: ...

    async def run(self, args: Any, context: ToolContext) -> Any:
        """``args`` is an instance of ``args_model``, already validated."""
        ...


def input_schema(tool: Tool) -> dict[str, Any]:
    """The JSON Schema of a tool's arguments, as a model sees it."""
    schema = tool.args_model.model_json_schema()
    schema.pop("title", None)  # the model name says nothing to the model
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    return schema


def safe_id(value: str) -> str:
    """``value`` with every character outside ``[0-9a-zA-Z_-]`` replaced by ``_``."""
    cleaned = _UNSAFE_ID_CHARS.sub("_", value)
    if not cleaned.strip("_."):
        raise ValueError(f"not a usable id: {value!r}")
    return cleaned


def session_directory(base: Path, session_id: str) -> Path:
    """The working directory of a session: ``<base>/<session_id>``.

    ``base`` must be the same absolute path on every executor (the Claude CLI keys
    its transcripts by working directory). The id is sanitised, and the result is
    checked to lie inside ``base``, so no session id can name a path outside it.
    """
    root = base.resolve()
    path = (root / safe_id(session_id)).resolve()
    if path.parent != root:
        raise ValueError(f"session directory {path} is outside the sandbox {root}")
    return path
