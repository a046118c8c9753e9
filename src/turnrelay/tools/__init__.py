"""Tools a model may call during a turn: the protocol, the registry and the built-ins."""

from turnrelay.tools.base import Tool, ToolContext, ToolError, session_directory
from turnrelay.tools.registry import ToolOutcome, ToolRegistry, build_registry, discover

__all__ = [
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolOutcome",
    "ToolRegistry",
    "build_registry",
    "discover",
    "session_directory",
]
