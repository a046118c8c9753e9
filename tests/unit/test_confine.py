"""The pieces that confine the Claude Code CLI, without the CLI: the environment
allow-list, the file-path guard, and what happens where bwrap is missing. The
real CLI under bwrap is tested in tests/e2e/test_claude_confinement.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from turnrelay.errors import ConfigError
from turnrelay.runtime.confine import check_sandbox, cli_environment, path_guard


def test_only_allow_listed_variables_reach_the_cli() -> None:
    environ = {
        "PATH": "/usr/bin",
        "LC_ALL": "C.UTF-8",
        "ANTHROPIC_API_KEY": "sk-ant",
        "HTTPS_PROXY": "http://proxy:3128",
        "OPENAI_API_KEY": "sk-openai",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "TURNRELAY_DATABASE_URL": "postgresql://secret",
        "DATABASE_URL": "postgresql://secret",
        "CLAUDECODE": "1",
        "PYTHONPATH": "/x",
    }
    assert cli_environment(environ) == {
        "PATH": "/usr/bin",
        "LC_ALL": "C.UTF-8",
        "ANTHROPIC_API_KEY": "sk-ant",
        "HTTPS_PROXY": "http://proxy:3128",
    }


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A sandbox with two sessions; the second holds a secret."""
    own, other = tmp_path / "own", tmp_path / "other"
    own.mkdir()
    other.mkdir()
    (other / "secret.txt").write_text("secret")
    (own / "mine.txt").write_text("mine")
    (own / "sub").mkdir()
    (own / "to-other").symlink_to(other / "secret.txt")
    (own / "to-mine").symlink_to(own / "mine.txt")
    (own / "to-root").symlink_to("/")
    return own, other


def _decide(workdir: Path, tool: str, arguments: dict[str, Any]) -> str:
    guard = path_guard(workdir)
    event: Any = {"hook_event_name": "PreToolUse", "tool_name": tool, "tool_input": arguments}
    out: Any = asyncio.run(guard(event, "toolu_1", {"signal": None}))
    return str(out.get("hookSpecificOutput", {}).get("permissionDecision", "none"))


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("Read", {"file_path": "mine.txt"}),
        ("Read", {"file_path": "{own}/mine.txt"}),
        ("Read", {"file_path": "sub/../mine.txt"}),
        ("Read", {"file_path": "to-mine"}),
        ("Read", {"file_path": "~/mine.txt"}),
        ("Write", {"file_path": "new/file.txt", "content": "x"}),
        ("Edit", {"file_path": "mine.txt", "old_string": "m", "new_string": "n"}),
        ("Glob", {"pattern": "**/*.txt"}),
        ("Glob", {"pattern": "{own}/sub/*.txt"}),
        ("Grep", {"pattern": "x"}),
        ("Grep", {"pattern": "x", "path": "sub"}),
        ("NotebookEdit", {"notebook_path": "n.ipynb", "new_source": ""}),
        ("Bash", {"command": "cat /etc/passwd"}),  # confined by bwrap, not by path
        ("mcp__turnrelay__read_upload", {"path": "/anything"}),  # checks itself
    ],
)
def test_paths_inside_the_session_are_allowed(
    layout: tuple[Path, Path], tool: str, arguments: dict[str, Any]
) -> None:
    own, _ = layout
    filled = {k: v.format(own=own) if isinstance(v, str) else v for k, v in arguments.items()}
    assert _decide(own, tool, filled) == "none"


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("Read", {"file_path": "{other}/secret.txt"}),
        ("Read", {"file_path": "../other/secret.txt"}),
        ("Read", {"file_path": "{own}/../other/secret.txt"}),
        ("Read", {"file_path": "to-other"}),
        ("Read", {"file_path": "to-root/etc/passwd"}),
        ("Read", {"file_path": "/proc/self/environ"}),
        ("Read", {"file_path": "~/../other/secret.txt"}),
        ("Read", {"file_path": 42}),
        ("Write", {"file_path": "{other}/secret.txt", "content": "x"}),
        ("Edit", {"file_path": "../other/secret.txt", "old_string": "s", "new_string": "t"}),
        ("Glob", {"pattern": "*", "path": "{other}"}),
        ("Glob", {"pattern": "../other/*"}),
        ("Glob", {"pattern": "sub/../../other/*"}),
        ("Glob", {"pattern": "/etc/*"}),
        ("Glob", {"pattern": "to-root/*"}),
        ("Grep", {"pattern": "secret", "path": ".."}),
        ("NotebookEdit", {"notebook_path": "/tmp/n.ipynb", "new_source": ""}),
        ("LS", {"path": "/"}),
    ],
)
def test_paths_outside_the_session_are_denied(
    layout: tuple[Path, Path], tool: str, arguments: dict[str, Any]
) -> None:
    own, other = layout
    filled = {
        k: v.format(own=own, other=other) if isinstance(v, str) else v for k, v in arguments.items()
    }
    assert _decide(own, tool, filled) == "deny"


async def test_bash_without_bwrap_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bubblewrap"):
        await check_sandbox(None, cli="/bin/true", sandbox=tmp_path, tools=["Read", "Bash"])
    # A tool this module does not know might run commands: the same.
    with pytest.raises(ConfigError, match="SomeNewTool"):
        await check_sandbox(None, cli="/bin/true", sandbox=tmp_path, tools=["SomeNewTool"])
    # Tools that run no commands go on, unconfined but path-checked.
    assert not await check_sandbox(None, cli="/bin/true", sandbox=tmp_path, tools=["Read"])


async def test_a_bwrap_that_does_not_work_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'no user namespaces here' >&2\nexit 1\n")
    broken.chmod(0o755)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    with pytest.raises(ConfigError, match="no user namespaces here"):
        await check_sandbox(str(broken), cli="/bin/true", sandbox=sandbox, tools=["Bash"])
    assert os.listdir(sandbox) == []  # the probe cleans up after itself
