"""The tool protocol, the registry (calls, errors, entry points) and the built-in tools."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from turnrelay.errors import ConfigError
from turnrelay.tools import (
    Tool,
    ToolContext,
    ToolError,
    ToolRegistry,
    build_registry,
    discover,
    session_directory,
)
from turnrelay.tools.builtin import Calculate, CurrentTime, ListUploads, ReadUpload


class EchoArgs(BaseModel):
    text: str
    times: int = 1


class Echo:
    name = "echo"
    description = "Repeat text."
    args_model = EchoArgs

    async def run(self, args: EchoArgs, context: ToolContext) -> str:
        return args.text * args.times


class Boom:
    name = "boom"
    description = "Always fails."
    args_model = EchoArgs

    async def run(self, args: EchoArgs, context: ToolContext) -> str:
        raise RuntimeError("the disk is on fire")


def _ctx(workdir: Path | None = None) -> ToolContext:
    return ToolContext("alice", "s1", "t1", workdir)


def _entry_points(**values: str) -> Any:
    def find(group: str) -> Iterable[EntryPoint]:
        return [EntryPoint(name=k, value=v, group=group) for k, v in values.items()]

    return find


# Entry points load these by module path.
ECHO_INSTANCE = Echo()


def make_tools() -> list[Tool]:
    return [Boom()]


def not_a_tool() -> int:
    return 3


async def test_a_call_validates_and_runs() -> None:
    registry = ToolRegistry([Echo()])
    outcome = await registry.call("echo", {"text": "ab", "times": 2}, _ctx())
    assert outcome.ok and outcome.output == "abab" and outcome.text == "abab"
    from_json = await registry.call("echo", '{"text": "x"}', _ctx())
    assert from_json.output == "x"


async def test_tool_errors_are_outcomes_not_exceptions() -> None:
    registry = ToolRegistry([Echo(), Boom()])
    unknown = await registry.call("nope", {}, _ctx())
    assert not unknown.ok and "Unknown tool 'nope'" in unknown.error and "echo" in unknown.error
    invalid = await registry.call("echo", {"times": "many"}, _ctx())
    assert not invalid.ok
    assert "Invalid arguments for tool 'echo'" in invalid.error
    assert "text: Field required" in invalid.error and "times:" in invalid.error
    not_json = await registry.call("echo", "{oops", _ctx())
    assert not not_json.ok and "not JSON" in not_json.error
    raised = await registry.call("boom", {"text": "x"}, _ctx())
    assert not raised.ok
    assert raised.error == "Tool 'boom' failed: RuntimeError: the disk is on fire"
    assert raised.text == raised.error


async def test_cancellation_propagates() -> None:
    class Slow:
        name = "slow"
        description = "Sleeps."
        args_model = EchoArgs

        async def run(self, args: EchoArgs, context: ToolContext) -> str:
            await asyncio.sleep(60)
            return "late"

    registry = ToolRegistry([Slow()])
    task = asyncio.create_task(registry.call("slow", {"text": "x"}, _ctx()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_registration_rules() -> None:
    registry = ToolRegistry([Echo()])
    with pytest.raises(ConfigError, match="two tools"):
        registry.register(Echo())
    bad = Echo()
    bad.name = "has space"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="must match"):
        registry.register(bad)
    with pytest.raises(ConfigError, match="not a tool"):
        registry.register(object())  # type: ignore[arg-type]
    ((name, description, schema),) = registry.schemas()
    assert (name, description) == ("echo", "Repeat text.")
    assert schema["type"] == "object" and schema["required"] == ["text"]
    assert "title" not in schema


def test_entry_point_discovery() -> None:
    here = __name__
    tools = discover(
        find=_entry_points(
            echo=f"{here}:ECHO_INSTANCE", more=f"{here}:make_tools", cls=f"{here}:Echo"
        )
    )
    assert sorted(t.name for t in tools) == ["boom", "echo", "echo"]
    with pytest.raises(ConfigError, match="failed to load"):
        discover(find=_entry_points(gone="no_such_module_xyz:Tool"))
    with pytest.raises(ConfigError, match="gave no tool"):
        discover(find=_entry_points(bad=f"{here}:not_a_tool"))


def test_build_registry_with_builtins_and_an_allow_list() -> None:
    registry = build_registry(find=_entry_points(more=f"{__name__}:make_tools"))
    assert registry.names() == [
        "current_time",
        "calculate",
        "list_uploads",
        "read_upload",
        "save_note",
        "boom",
    ]
    only = build_registry(["calculate"], find=_entry_points())
    assert only.names() == ["calculate"]
    with pytest.raises(ConfigError, match="unknown tools 'nope'"):
        build_registry(["nope"], find=_entry_points())


async def test_current_time() -> None:
    tool = CurrentTime(now=lambda: datetime(2026, 1, 15, 12, 0, tzinfo=UTC))
    out = await tool.run(tool.args_model(timezone="Asia/Tokyo"), _ctx())
    assert out == {
        "timezone": "Asia/Tokyo",
        "iso": "2026-01-15T21:00:00+09:00",
        "weekday": "Thursday",
        "utc_offset": "+0900",
    }
    with pytest.raises(ToolError, match="unknown time zone"):
        await tool.run(tool.args_model(timezone="Mars/Olympus"), _ctx())


@pytest.mark.parametrize(
    ("expression", "result"),
    [
        ("0.1 + 0.2", "0.3"),
        ("(1.10 + 2.20) * 3", "9.9"),
        ("10 / 4", "2.5"),
        ("1 / 3", "0." + "3" * 50),
        ("2 ** 100", "1267650600228229401496703205376"),
        ("-7 // 2", "-3"),
        ("7 % 3", "1"),
        ("123456789012345678901234567890 + 1", "123456789012345678901234567891"),
    ],
)
async def test_calculate_is_exact(expression: str, result: str) -> None:
    out = await Calculate().run(Calculate.args_model(expression=expression), _ctx())
    assert out == {"expression": expression, "result": result}


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1 / 0", "division by zero"),
        ("__import__('os')", "unsupported"),
        ("2 ** 0.5", "whole numbers"),
        ("2 ** 100000", "whole numbers"),
        ("1 +", "not an arithmetic expression"),
    ],
)
async def test_calculate_refuses(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        await Calculate().run(Calculate.args_model(expression=expression), _ctx())


async def test_uploads_are_read_inside_the_session_only(tmp_path: Path) -> None:
    workdir = session_directory(tmp_path / "sandbox", "s-1")
    uploads = workdir / "uploads"
    (uploads / "notes").mkdir(parents=True)
    (uploads / "notes" / "a.txt").write_text("hello upload")
    (uploads / "blob.bin").write_bytes(b"\x00\x01")
    (tmp_path / "secret.txt").write_text("secret")
    (uploads / "link.txt").symlink_to(tmp_path / "secret.txt")
    ctx = _ctx(workdir)

    listed = await ListUploads().run(ListUploads.args_model(), ctx)
    assert listed == [{"path": "blob.bin", "size": 2}, {"path": "notes/a.txt", "size": 12}]
    read = ReadUpload()
    out = await read.run(read.args_model(path="notes/a.txt", max_chars=5), ctx)
    assert out == {"path": "notes/a.txt", "size": 12, "content": "hello", "truncated": True}
    for path, message in [
        ("../../secret.txt", "not a file"),
        ("/etc/passwd", "not a file"),
        ("link.txt", "not a file"),
        ("blob.bin", "binary"),
        ("missing.txt", "no uploaded file"),
    ]:
        with pytest.raises(ToolError, match=message):
            await read.run(read.args_model(path=path), ctx)
    assert await ListUploads().run(ListUploads.args_model(), _ctx(tmp_path / "none")) == []


def test_session_directory_stays_in_the_sandbox(tmp_path: Path) -> None:
    base = tmp_path / "sandbox"
    assert session_directory(base, "abc-123") == base.resolve() / "abc-123"
    assert session_directory(base, "../../etc") == base.resolve() / "______etc"
    with pytest.raises(ValueError):
        session_directory(base, "..")


class Transfer:
    """Asks for approval above a threshold (a rule over the arguments)."""

    name = "transfer"
    description = "Move money."
    args_model = EchoArgs

    @staticmethod
    def needs_approval(args: EchoArgs) -> bool:
        return args.times > 1

    async def run(self, args: EchoArgs, context: ToolContext) -> str:
        return "moved"


class Moody(Transfer):
    name = "moody"

    @staticmethod
    def needs_approval(args: EchoArgs) -> bool:
        raise RuntimeError("cannot decide")


def test_which_calls_need_approval() -> None:
    from turnrelay.tools.builtin import SaveNote

    registry = ToolRegistry([Echo(), Transfer(), Moody(), SaveNote()], require_approval=["echo"])
    assert registry.needs_approval("save_note", {"text": "x"})  # declared
    assert registry.needs_approval("echo", '{"text": "x"}')  # by the setting
    assert registry.needs_approval("transfer", '{"text": "x", "times": 5}')  # by its rule
    assert not registry.needs_approval("transfer", {"text": "x", "times": 1})
    assert registry.needs_approval("moody", {"text": "x"})  # a rule that raises: ask
    # Calls that fail without running need no approval.
    assert not registry.needs_approval("transfer", "not json")
    assert not registry.needs_approval("transfer", {"times": 5})
    assert not registry.needs_approval("nope", {})


def test_approval_setting_names_known_tools() -> None:
    with pytest.raises(ConfigError, match="TOOLS_REQUIRING_APPROVAL names unknown tools 'nope'"):
        build_registry(require_approval=["nope"], find=_entry_points())
    registry = build_registry(["calculate"], require_approval=["calculate"], find=_entry_points())
    assert registry.needs_approval("calculate", {"expression": "1+1"})


async def test_save_note_appends_to_the_session_notes(tmp_path: Path) -> None:
    from turnrelay.tools.builtin import NOTES_FILE, SaveNote

    registry = ToolRegistry([SaveNote()])
    first = await registry.call("save_note", {"text": "buy  milk\nnow"}, _ctx(tmp_path / "s1"))
    second = await registry.call("save_note", {"text": "call Bob"}, _ctx(tmp_path / "s1"))
    assert first.ok and first.output == {"saved": True, "notes": 1}
    assert second.output == {"saved": True, "notes": 2}
    assert (tmp_path / "s1" / NOTES_FILE).read_text() == "- buy milk now\n- call Bob\n"
    nowhere = await registry.call("save_note", {"text": "x"}, _ctx(None))
    assert not nowhere.ok and "no session directories" in nowhere.error
