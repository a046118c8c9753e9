"""Built-in tools: useful to a copilot, and none of them touches the network.

    current_time    the date and time in an IANA time zone
    calculate       arithmetic on exact decimals (``0.1 + 0.2`` is ``0.3``)
    list_uploads    the files the user uploaded to the session
    read_upload     the text of one of them

Uploads are the files in the ``uploads/`` folder of the session's working
directory; a path that leads outside it (``..``, an absolute path, a symlink out)
is refused.
"""

from __future__ import annotations

import ast
import asyncio
import decimal
import operator
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field

from turnrelay.tools.base import Tool, ToolContext, ToolError

UPLOADS_DIR = "uploads"


class CurrentTimeArgs(BaseModel):
    timezone: str = Field(
        "UTC", description="An IANA time zone name, e.g. 'Europe/Paris' or 'America/New_York'."
    )


class CurrentTime:
    name = "current_time"
    description = "The current date and time in a time zone."
    args_model = CurrentTimeArgs

    def __init__(self, now: Callable[[], datetime] | None = None) -> None:
        self._now = now or (lambda: datetime.now(UTC))

    async def run(self, args: CurrentTimeArgs, context: ToolContext) -> dict[str, Any]:
        try:
            zone = ZoneInfo(args.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolError(f"unknown time zone {args.timezone!r}") from None
        now = self._now().astimezone(zone)
        return {
            "timezone": args.timezone,
            "iso": now.isoformat(timespec="seconds"),
            "weekday": now.strftime("%A"),
            "utc_offset": now.strftime("%z"),
        }


class CalculateArgs(BaseModel):
    expression: str = Field(
        max_length=500,
        description="Arithmetic with + - * / // % ** and parentheses, e.g. '(1.10 + 2.20) * 3'.",
    )


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
# Beyond this an exponent makes numbers no one needs and costs real CPU.
MAX_EXPONENT = 1000
PRECISION = 50


class Calculate:
    name = "calculate"
    description = (
        "Evaluate an arithmetic expression exactly, with decimal numbers "
        f"({PRECISION} significant digits): use it rather than doing arithmetic yourself."
    )
    args_model = CalculateArgs

    async def run(self, args: CalculateArgs, context: ToolContext) -> dict[str, str]:
        source = args.expression.strip()
        try:
            tree = ast.parse(source, mode="eval")
        except SyntaxError:
            raise ToolError(f"not an arithmetic expression: {source!r}") from None
        with decimal.localcontext() as ctx:
            ctx.prec = PRECISION
            ctx.traps[decimal.Inexact] = False
            try:
                result = self._eval(tree.body, source)
            except decimal.DivisionByZero:
                raise ToolError("division by zero") from None
            except (decimal.InvalidOperation, decimal.Overflow) as exc:
                reason = type(exc).__name__
                raise ToolError(f"the result is undefined or too large ({reason})") from None
        return {"expression": source, "result": _plain(result)}

    def _eval(self, node: ast.expr, source: str) -> decimal.Decimal:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            # The literal as written, never through a float: 0.1 stays exactly 0.1.
            return decimal.Decimal(ast.get_source_segment(source, node) or str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = self._eval(node.operand, source)
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, source), self._eval(node.right, source)
            if isinstance(node.op, ast.Pow):
                if right != right.to_integral_value() or abs(right) > MAX_EXPONENT:
                    raise ToolError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
                return left ** int(right)
            op = _BINARY.get(type(node.op))
            if op is not None:
                result: decimal.Decimal = op(left, right)
                return result
        raise ToolError(
            f"unsupported in an arithmetic expression: {ast.get_source_segment(source, node)!r}"
        )


def _plain(value: decimal.Decimal) -> str:
    """No exponent notation for numbers people read, no trailing zeros after a point."""
    if value.is_zero():
        return "0"
    if abs(value.adjusted()) > PRECISION:
        return str(value)
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _uploads(context: ToolContext) -> Path:
    if context.workdir is None:
        raise ToolError("this session has no uploaded files")
    return context.workdir / UPLOADS_DIR


def _inside(root: Path, relative: str) -> Path:
    base = root.resolve()
    path = (base / relative).resolve()
    if path == base or not path.is_relative_to(base):
        raise ToolError(f"{relative!r} is not a file in the session's uploads")
    return path


class ListUploadsArgs(BaseModel):
    pass


class ListUploads:
    name = "list_uploads"
    description = "List the files the user uploaded to this conversation, with their sizes."
    args_model = ListUploadsArgs

    async def run(self, args: ListUploadsArgs, context: ToolContext) -> list[dict[str, Any]]:
        root = _uploads(context)
        return await asyncio.to_thread(_list, root)


def _list(root: Path) -> list[dict[str, Any]]:
    if not root.is_dir():
        return []
    base = root.resolve()
    files = []
    for path in sorted(base.rglob("*")):
        if path.is_file() and path.resolve().is_relative_to(base):
            files.append({"path": path.relative_to(base).as_posix(), "size": path.stat().st_size})
    return files


class ReadUploadArgs(BaseModel):
    path: str = Field(description="The file's path as list_uploads gives it.")
    max_chars: int = Field(20_000, ge=1, le=200_000, description="Read at most this much text.")


class ReadUpload:
    name = "read_upload"
    description = "Read a text file the user uploaded to this conversation."
    args_model = ReadUploadArgs

    async def run(self, args: ReadUploadArgs, context: ToolContext) -> dict[str, Any]:
        path = _inside(_uploads(context), args.path)
        return await asyncio.to_thread(_read, path, args.path, args.max_chars)


def _read(path: Path, name: str, max_chars: int) -> dict[str, Any]:
    if not path.is_file():
        raise ToolError(f"no uploaded file {name!r}")
    # Four bytes per character at most in UTF-8: never read more than could be shown.
    with path.open("rb") as file:
        data = file.read(max_chars * 4 + 4)
    if b"\x00" in data:
        raise ToolError(f"{name!r} is a binary file")
    text = data.decode("utf-8", errors="replace")
    size = path.stat().st_size
    truncated = len(text) > max_chars or len(data) < size
    return {"path": name, "size": size, "content": text[:max_chars], "truncated": truncated}


NOTES_FILE = "notes.md"


class SaveNoteArgs(BaseModel):
    text: str = Field(min_length=1, max_length=4000, description="The note, as plain text.")


class SaveNote:
    """Writes to the session's directory, so it asks the user first: a model
    must not change what the user keeps without their say."""

    name = "save_note"
    description = (
        "Save a note to the user's notes for this conversation. The user is asked to "
        "approve it first; if they deny it, do not retry."
    )
    args_model = SaveNoteArgs
    needs_approval = True

    async def run(self, args: SaveNoteArgs, context: ToolContext) -> dict[str, Any]:
        if context.workdir is None:
            raise ToolError("this executor has no session directories to keep notes in")
        return await asyncio.to_thread(_append_note, context.workdir, args.text)


def _append_note(workdir: Path, text: str) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / NOTES_FILE
    with path.open("a", encoding="utf-8") as file:
        file.write(f"- {' '.join(text.split())}\n")
    count = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line)
    return {"saved": True, "notes": count}


def builtin_tools() -> list[Tool]:
    return [CurrentTime(), Calculate(), ListUploads(), ReadUpload(), SaveNote()]
