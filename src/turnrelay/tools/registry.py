"""The tool registry: which tools a turn offers, and the one way to call them.

Both runtimes call tools through ``ToolRegistry.call``, so a tool behaves the same
whichever runtime runs the turn: an unknown tool, arguments that do not validate,
and a tool that raises all come back as a failed ``ToolOutcome`` whose message the
model reads as a tool error; the turn goes on. Only cancellation propagates.

Third-party packages add tools through the ``turnrelay.tools`` entry-point group::

    [project.entry-points."turnrelay.tools"]
    weather = "my_package.tools:WeatherTool"

An entry point may name a tool instance, a class or factory called with no
arguments that returns a tool, or one that returns several tools.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError

from turnrelay.errors import ConfigError
from turnrelay.tools.base import TOOL_NAME, Tool, ToolContext, ToolError, input_schema

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "turnrelay.tools"
# A tool's text beyond this is cut before the model sees it: one runaway tool must
# not fill the model's context window.
MAX_OUTPUT_CHARS = 64_000


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What one tool call gave: ``output`` when ``ok``, else ``error``."""

    ok: bool
    output: Any = None
    error: str = ""

    @property
    def text(self) -> str:
        """What the model reads: the output (JSON unless a string), or the error."""
        if not self.ok:
            return self.error
        text = (
            self.output
            if isinstance(self.output, str)
            else json.dumps(self.output, ensure_ascii=False, default=str)
        )
        if len(text) > MAX_OUTPUT_CHARS:
            text = text[:MAX_OUTPUT_CHARS] + f"\n[output cut at {MAX_OUTPUT_CHARS} characters]"
        return text


class ToolRegistry:
    """Tools by name, in registration order."""

    def __init__(self, tools: Iterable[Tool] = (), *, require_approval: Iterable[str] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._schemas: list[tuple[str, str, dict[str, Any]]] | None = None
        self._require_approval = frozenset(require_approval)
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if not isinstance(tool, Tool):
            raise ConfigError(f"{tool!r} is not a tool (name, description, args_model, run)")
        if not TOOL_NAME.match(tool.name):
            raise ConfigError(f"tool name {tool.name!r} must match {TOOL_NAME.pattern}")
        if tool.name in self._tools:
            raise ConfigError(f"two tools are named {tool.name!r}")
        self._tools[tool.name] = tool
        self._schemas = None

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def schemas(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(name, description, JSON Schema of the arguments)`` per tool: made once
        (pydantic's schema generation cost a turn ~2 ms) and shared, so callers
        must not change them."""
        if self._schemas is None:
            self._schemas = [(t.name, t.description, input_schema(t)) for t in self]
        return self._schemas

    def needs_approval(self, name: str, arguments: Any) -> bool:
        """Whether this call waits for the user's approval before it runs: the
        tool is named in the setting, or its ``needs_approval`` says so (for
        these arguments, when it is a function). A call that cannot run anyway
        (unknown tool, arguments that do not validate) needs none: it fails
        without running. A rule that raises asks for approval."""
        tool = self._tools.get(name)
        if tool is None:
            return False
        if name in self._require_approval:
            return True
        rule = getattr(tool, "needs_approval", False)
        if not callable(rule):
            return bool(rule)
        try:
            args = tool.args_model.model_validate(_arguments(arguments))
        except (ValueError, ValidationError):
            return False
        try:
            return bool(rule(args))
        except Exception:
            log.warning("tool %s: needs_approval raised; asking for approval", name, exc_info=True)
            return True

    async def call(self, name: str, arguments: Any, context: ToolContext) -> ToolOutcome:
        """Validate ``arguments`` (a dict, or JSON text of one) and run the tool."""
        tool = self._tools.get(name)
        if tool is None:
            available = ", ".join(self._tools) or "none"
            return ToolOutcome(False, error=f"Unknown tool {name!r}. Available tools: {available}.")
        try:
            arguments = _arguments(arguments)
        except ValueError as exc:
            return ToolOutcome(
                False, error=f"Invalid arguments for tool {name!r}: not JSON ({exc})."
            )
        try:
            args = tool.args_model.model_validate(arguments)
        except ValidationError as exc:
            return ToolOutcome(
                False, error=f"Invalid arguments for tool {name!r}: {_validation_summary(exc)}."
            )
        try:
            output = await tool.run(args, context)
        except ToolError as exc:
            return ToolOutcome(False, error=f"Tool {name!r} failed: {exc.detail}")
        except Exception as exc:
            log.warning("tool %s raised", name, exc_info=True)
            return ToolOutcome(False, error=f"Tool {name!r} failed: {_describe(exc)}")
        return ToolOutcome(True, output=output)


def _arguments(arguments: Any) -> Any:
    """``arguments`` as given, or decoded from JSON text (``ValueError`` if not JSON)."""
    if isinstance(arguments, str | bytes):
        return json.loads(arguments) if arguments.strip() else {}
    return {} if arguments is None else arguments


def _validation_summary(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "arguments"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _tools_from(entry: EntryPoint) -> list[Tool]:
    try:
        loaded = entry.load()
    except Exception as exc:
        raise ConfigError(
            f"tool entry point {entry.name!r} ({entry.value}) failed to load: {_describe(exc)}"
        ) from exc
    made: Any = loaded
    if not isinstance(loaded, Tool) and callable(loaded):
        try:
            made = loaded()
        except Exception as exc:
            raise ConfigError(
                f"tool entry point {entry.name!r} ({entry.value}) failed: {_describe(exc)}"
            ) from exc
    found = [made] if isinstance(made, Tool) else list(made) if isinstance(made, Iterable) else []
    if not found or not all(isinstance(t, Tool) for t in found):
        raise ConfigError(f"tool entry point {entry.name!r} ({entry.value}) gave no tool")
    return found


def discover(
    group: str = ENTRY_POINT_GROUP,
    *,
    find: Callable[[str], Iterable[EntryPoint]] | None = None,
) -> list[Tool]:
    """The tools that installed packages register under ``group``.

    A broken entry point is a ``ConfigError`` at startup rather than a tool that
    silently goes missing. ``find`` replaces the installed-package lookup (tests).
    """
    lookup = find or (lambda name: entry_points(group=name))
    tools: list[Tool] = []
    for entry in sorted(lookup(group), key=lambda e: e.name):
        tools.extend(_tools_from(entry))
    return tools


def build_registry(
    enabled: Sequence[str] = (),
    *,
    require_approval: Sequence[str] = (),
    builtins: bool = True,
    find: Callable[[str], Iterable[EntryPoint]] | None = None,
) -> ToolRegistry:
    """Built-in and discovered tools; ``enabled`` (when not empty) keeps only those
    named; ``require_approval`` names tools whose every call waits for the
    user's approval. Naming a tool that does not exist is a ``ConfigError``."""
    from turnrelay.tools.builtin import builtin_tools

    found = [*(builtin_tools() if builtins else ()), *discover(find=find)]
    known = [t.name for t in found]
    for setting, names in (
        ("TURNRELAY_TOOLS", enabled),
        ("TURNRELAY_TOOLS_REQUIRING_APPROVAL", require_approval),
    ):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ConfigError(
                f"{setting} names unknown tools {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(known) or 'none'}"
            )
    kept = [t for t in found if not enabled or t.name in enabled]
    return ToolRegistry(kept, require_approval=require_approval)
