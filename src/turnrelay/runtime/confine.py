"""Confining the Claude Code CLI to one session: its environment, its view of the
filesystem, and the paths its file tools may touch.

* **Environment.** The SDK starts the CLI with this process's whole environment
  plus its own variables, so ``cli_path`` is a small launcher (``write_launcher``)
  that keeps only ``CLI_ENV_NAMES`` (and ``LC_*``): what the CLI needs to run and
  to reach the model. Database URLs, broker URLs, cloud credentials, other
  providers' keys never reach the CLI or anything it runs.
* **Filesystem.** With bubblewrap (``bwrap``) the launcher runs the CLI in its own
  mount, PID, IPC and UTS namespaces (``bwrap_argv``): the system directories
  read-only, a private ``/tmp``, the session's directory the only writable place,
  and no other session's directory at all (the sandbox base is an empty tmpfs
  around it). The CLI and every command its ``Bash`` tool runs see only their
  own processes in ``/proc``, so no other process's environment either. The
  network is shared: the CLI must reach the model.
* **File tools.** ``path_guard`` is a PreToolUse hook that denies any built-in
  tool (Read, Write, Edit, Glob, Grep, NotebookEdit, …) a path whose resolved
  form (``..`` and symlinks followed) is outside the session's directory, bwrap or
  not: inside the sandbox the system directories are still readable.

A tool outside ``NEEDS_NO_SANDBOX`` (``Bash``, or a name not known here) can run
commands, so enabling one where bwrap does not work is a ``ConfigError`` at
startup (``check_sandbox``), never an unconfined run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn, cast

from turnrelay.errors import ConfigError

if TYPE_CHECKING:  # the launcher imports this module: it must not load the SDK
    from claude_agent_sdk.types import HookContext, HookInput, SyncHookJSONOutput

# The CLI's traffic that a turn does not need (telemetry, update checks, error
# reports, surveys): off, so a turn only ever calls the model endpoint.
QUIET_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1",
}
CLI_ENV_NAMES = frozenset(
    {
        # to run: where programs are, locale, time zone, and the session's own
        # home, configuration and temporary directories (set per turn)
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "HOME",
        "PWD",
        "TMPDIR",
        "CLAUDE_CONFIG_DIR",
        # to reach the model through a proxy or a private CA
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "NODE_EXTRA_CA_CERTS",
        # the model endpoint, its credentials, and how patiently to call it
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "CLAUDE_CODE_MAX_RETRIES",
        "API_TIMEOUT_MS",
        # what the SDK itself sets for the CLI it starts
        "CLAUDE_CODE_ENTRYPOINT",
        "CLAUDE_AGENT_SDK_VERSION",
        "CLAUDE_AGENT_SDK_CLIENT_APP",
        "CLAUDE_AGENT_SDK_DERIVED_CLIENT_APP",
        "CLAUDE_CODE_SDK_READS_SESSION_STATE",
        "CLAUDE_CODE_ENABLE_SDK_FILE_CHECKPOINTING",
        *QUIET_ENV,
    }
)
CLI_ENV_PREFIXES = ("LC_",)
# Built-in tools that run no command of the model's choosing; any other needs bwrap.
NEEDS_NO_SANDBOX = frozenset(
    {
        "Read",
        "Write",
        "Edit",
        "MultiEdit",
        "Glob",
        "Grep",
        "LS",
        "NotebookEdit",
        "NotebookRead",
        "WebFetch",
        "WebSearch",
        "TodoWrite",
    }
)
# What a sandbox sees of the system, read-only (those that exist here).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# The input fields in which built-in tools name files or directories.
PATH_FIELDS = ("file_path", "path", "notebook_path")
_GLOB_MAGIC = frozenset("*?[{")


def cli_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` reduced to what the CLI may see."""
    return {
        k: v for k, v in environ.items() if k in CLI_ENV_NAMES or k.startswith(CLI_ENV_PREFIXES)
    }


def bwrap_argv(bwrap: str, *, readable: Sequence[str], sandbox: Path, workdir: Path) -> list[str]:
    """The bwrap command (without the program) that confines a program to
    ``workdir``: the system and ``readable`` read-only, nothing else of the host."""
    argv = [
        bwrap,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
    ]
    for directory in SYSTEM_DIRS:
        argv += ["--ro-bind-try", directory, directory]
    argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    places = {str(Path(p).resolve()) for p in readable}
    # A CA bundle or resolver configuration that lives outside /etc.
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS"):
        if os.environ.get(name):
            places.add(str(Path(os.environ[name]).resolve()))
    places.add(str(Path("/etc/resolv.conf").resolve()))
    for path in sorted(places):
        argv += ["--ro-bind-try", path, path]
    argv += ["--tmpfs", str(sandbox), "--bind", str(workdir), str(workdir)]
    argv += ["--chdir", str(workdir), "--"]
    return argv


def write_launcher(directory: Path, *, cli: str, bwrap: str | None, sandbox: Path) -> Path:
    """An executable for ``ClaudeAgentOptions.cli_path`` that runs ``cli`` through
    ``launch``: the SDK cannot be told to drop the parent's environment itself."""
    path = directory / "claude"
    config = {"cli": cli, "bwrap": bwrap, "sandbox": str(sandbox)}
    path.write_text(
        f"#!{sys.executable} -I\nfrom turnrelay.runtime.confine import launch\nlaunch({config!r})\n"
    )
    path.chmod(0o700)
    return path


def launch(config: Mapping[str, Any]) -> NoReturn:
    """The launcher's body: replace this process with the (confined) CLI. The SDK
    starts it in the session's directory, which is therefore the one it may write."""
    workdir = Path.cwd().resolve()
    sandbox = Path(config["sandbox"]).resolve()
    if workdir.parent != sandbox:
        sys.exit(f"turnrelay: the CLI must start in a session directory of {sandbox}")
    argv = [config["cli"], *sys.argv[1:]]
    if config["bwrap"]:
        confine = bwrap_argv(
            config["bwrap"], readable=[_cli_dir(config["cli"])], sandbox=sandbox, workdir=workdir
        )
        argv = [*confine, *argv]
    os.execve(argv[0], argv, cli_environment(os.environ))


def _cli_dir(cli: str) -> str:
    return str(Path(cli).resolve().parent)


async def check_sandbox(
    bwrap: str | None, *, cli: str, sandbox: Path, tools: Sequence[str]
) -> bool:
    """Whether the CLI runs under bwrap: it does wherever bwrap works. Raises
    ``ConfigError`` when a tool in ``tools`` runs commands and bwrap does not work."""
    import asyncio  # here, not at the top: the launcher imports this module on every turn

    needing = sorted(set(tools) - NEEDS_NO_SANDBOX)
    problem = "bwrap (Debian package `bubblewrap`) is not on PATH" if bwrap is None else None
    if bwrap is not None:
        # The CLI itself, confined as a turn's will be, in a directory of its own.
        probe = Path(tempfile.mkdtemp(prefix=".bwrap-probe-", dir=sandbox))
        try:
            proc = await asyncio.create_subprocess_exec(
                *bwrap_argv(bwrap, readable=[_cli_dir(cli)], sandbox=sandbox, workdir=probe),
                cli,
                "--version",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={**cli_environment(os.environ), "HOME": str(probe)},
            )
            _, err = await proc.communicate()
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        if proc.returncode != 0:
            detail = " ".join(err.decode(errors="replace").split())[:300]
            problem = f"bwrap does not work here ({detail or f'exit code {proc.returncode}'})"
    if problem is None:
        return True
    if needing:
        raise ConfigError(
            f"TURNRELAY_CLAUDE_TOOLS enables {', '.join(needing)}, which can run commands; "
            "turnrelay runs them only confined to the session's directory by bubblewrap, "
            f"and {problem}. Install bubblewrap or remove {', '.join(needing)}."
        )
    return False


def path_guard(
    workdir: Path,
) -> Callable[[HookInput, str | None, HookContext], Awaitable[SyncHookJSONOutput]]:
    """A PreToolUse hook: built-in tools may only name paths inside ``workdir``."""
    root = Path(os.path.realpath(workdir))

    async def guard(
        event: HookInput, tool_use_id: str | None, context: HookContext
    ) -> SyncHookJSONOutput:
        data = cast(Mapping[str, Any], event)
        tool = str(data.get("tool_name", ""))
        if tool.startswith("mcp__"):
            return {}  # turnrelay's own tools, which check their paths themselves
        arguments = data.get("tool_input") or {}
        for place in _named_paths(tool, arguments, root):
            if place is None or not _inside(place, root):
                return _deny(
                    f"{tool}: that path is outside this session's directory; tools here "
                    f"may only touch files in {root}"
                )
        return {}

    return guard


def _named_paths(tool: str, arguments: Mapping[str, Any], root: Path) -> list[Path | None]:
    """Every place a tool call names (``None``: one that cannot be checked)."""
    places: list[Path | None] = []
    for field in PATH_FIELDS:
        value = arguments.get(field)
        if isinstance(value, str) and value:
            places.append(_resolve(value, root))
        elif value is not None and value != "":
            places.append(None)
    if tool == "Glob" and isinstance(arguments.get("pattern"), str):
        base = arguments.get("path") or str(root)
        places.append(_glob_base(str(arguments["pattern"]), _resolve(str(base), root)))
    return places


def _resolve(value: str, root: Path) -> Path:
    if value == "~" or value.startswith("~/"):
        value = str(root) + value[1:]  # the CLI's HOME is the session's directory
    return Path(os.path.realpath(root / value))


def _glob_base(pattern: str, base: Path) -> Path | None:
    """The directory a glob searches from, or ``None`` when it climbs out (``..``)."""
    parts = PurePosixPath(pattern).parts
    if ".." in parts:
        return None
    literal: list[str] = []
    for part in parts:
        if _GLOB_MAGIC & set(part):
            break
        literal.append(part)
    return Path(os.path.realpath(base.joinpath(*literal)))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _deny(reason: str) -> SyncHookJSONOutput:
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": reason,
        }
    }
