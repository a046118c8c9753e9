"""With the CLI's own file and shell tools enabled, a session stays in its own
directory and sees none of the executor's secrets: `turnrelay serve` runs the
real bundled Claude Code CLI against `turnrelay fake-llm`, all as real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import skip_or_fail
from tests.e2e.conftest import new_session
from tests.e2e.test_claude_runtime import _cli_processes, require_claude_sdk
from tests.procs import SSE, FakeLLMProc, Proc, free_port, iter_sse, read_sse, start

pytestmark = pytest.mark.slow

SECRET = uuid.uuid4().hex
# What the executor's environment holds and no tool may see.
SECRETS = {
    "OPENAI_API_KEY": f"sk-openai-{SECRET}",
    "AWS_SECRET_ACCESS_KEY": f"aws-{SECRET}",
    "PGPASSWORD": f"pg-{SECRET}",
}


@dataclass
class Server:
    proc: Proc
    sandbox: Path
    tmp: Path


@pytest.fixture(scope="module")
def confined(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Server]:
    require_claude_sdk()
    if shutil.which("bwrap") is None:
        skip_or_fail("bubblewrap is not installed (apt-get install bubblewrap)")
    tmp = tmp_path_factory.mktemp("serve-confined")
    sandbox = tmp / "sandbox"
    port = free_port()
    proc = start(
        "serve-confined",
        ["serve", "--port", str(port)],
        tmp=tmp,
        env={
            "TURNRELAY_MODEL": "claude:fake",
            "TURNRELAY_SANDBOX_DIR": str(sandbox),
            "TURNRELAY_CLAUDE_TOOLS": "Read,Bash,Glob,Grep,Write",
            "TURNRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/db-{SECRET}.db",
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{llm.port}",
            "ANTHROPIC_API_KEY": "sk-fake",
            "CLAUDE_CODE_MAX_RETRIES": "0",
            **SECRETS,
        },
        health_url=f"http://127.0.0.1:{port}/health",
    )
    proc.url = f"http://127.0.0.1:{port}"
    yield Server(proc, sandbox, tmp)
    proc.stop()


@pytest.fixture
def client(confined: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=confined.proc.url, timeout=60) as c:
        yield c


def _call(
    client: httpx.Client, llm: FakeLLMProc, sid: str, tool: str, args: dict[str, Any]
) -> tuple[SSE, str, bool]:
    """One turn in which the model calls ``tool``: the stream, the tool result's
    text as the model received it in its next request, and whether it was an error."""
    marker = uuid.uuid4().hex[:10]
    message = f"{marker} fake:tool={tool}:{json.dumps(args)}"
    with client.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": message}) as r:
        assert r.status_code == 200
        sse = read_sse(r)
    assert sse.done and sse.chunks[-1]["type"] == "finish", sse.chunks[-3:]
    answered = [
        r for r in llm.requests() if marker in json.dumps(r.get("body") or {}) and _result(r)
    ]
    assert len(answered) == 1, f"the model never got the {tool} result"
    text, is_error = _result(answered[0])  # type: ignore[misc]
    return sse, text, is_error


def _result(record: dict[str, Any]) -> tuple[str, bool] | None:
    last = ((record.get("body") or {}).get("messages") or [{}])[-1]
    for block in last.get("content") or ():
        if isinstance(block, dict) and block.get("type") == "tool_result":
            content = block.get("content")
            if isinstance(content, list):
                content = "\n".join(str(p.get("text", "")) for p in content)
            return str(content or ""), bool(block.get("is_error"))
    return None


def _assert_no_secret(text: str) -> None:
    assert SECRET not in text, text
    for name in [*SECRETS, "TURNRELAY_"]:
        assert name not in text, (name, text)


def _session_dir(server: Server, sid: str) -> Path:
    path = server.sandbox / sid
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- environment ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", ["env", "cat /proc/self/environ | tr '\\0' '\\n'", "cat /proc/1/environ"]
)
def test_bash_sees_none_of_the_executors_secrets(
    client: httpx.Client, llm: FakeLLMProc, confined: Server, command: str
) -> None:
    sid = new_session(client)
    _, text, _ = _call(client, llm, sid, "Bash", {"command": command})
    _assert_no_secret(text)
    if command != "cat /proc/1/environ":
        assert "PATH=" in text  # the command ran and printed an environment
        assert f"HOME={confined.sandbox / sid}" in text


def test_bash_cannot_read_the_executors_process(
    client: httpx.Client, llm: FakeLLMProc, confined: Server
) -> None:
    pid = confined.proc.popen.pid
    sid = new_session(client)
    command = f"cat /proc/{pid}/environ; ls /proc | grep -c '^[0-9]'"
    _, text, _ = _call(client, llm, sid, "Bash", {"command": command})
    _assert_no_secret(text)
    assert "No such file" in text
    # Only the sandbox's own processes are there (its init, the CLI, the shell...).
    assert int(text.strip().splitlines()[-1]) < 10, text


def test_the_clis_environment_is_the_allow_list(
    client: httpx.Client, llm: FakeLLMProc, confined: Server
) -> None:
    from turnrelay.runtime.confine import CLI_ENV_NAMES, CLI_ENV_PREFIXES

    sid = new_session(client)
    r = client.post(
        f"/api/chat/sessions/{sid}/turns", json={"message": "slow fake:tokens=200 fake:delay_ms=50"}
    )
    assert r.status_code == 202
    with client.stream("GET", f"/api/chat/sessions/{sid}/stream") as s:
        for _, data in iter_sse(s):
            if data and json.loads(data)["type"] == "text-delta":
                break
        (cli,) = [p for p in _cli_processes(confined.proc) if p.name() == "claude"]
        environ, cwd = cli.environ(), cli.cwd()
        # The CLI runs under bwrap, a child of the executor.
        pid = confined.proc.popen.pid
        (sandbox,) = [p for p in cli.parents() if p.name() == "bwrap" and p.ppid() == pid]
        assert client.post(f"/api/chat/sessions/{sid}/cancel").json()["cancelled"] is True
    # Nothing of the sandbox outlives the turn.
    deadline = time.monotonic() + 10
    while psutil.Process(pid).children(recursive=True):
        assert time.monotonic() < deadline, psutil.Process(pid).children(recursive=True)
        time.sleep(0.1)
    assert not sandbox.is_running()
    unexpected = {
        name
        for name in environ
        if name not in CLI_ENV_NAMES and not name.startswith(CLI_ENV_PREFIXES)
    }
    assert not unexpected, unexpected
    _assert_no_secret(json.dumps(environ))
    workdir = confined.sandbox / sid
    assert environ["HOME"] == str(workdir)
    assert environ["CLAUDE_CONFIG_DIR"] == str(workdir / ".claude")
    assert environ["TMPDIR"].startswith(f"{workdir}/")
    assert Path(cwd) == workdir


# -- the session's directory ------------------------------------------------------------


@pytest.fixture
def neighbour(client: httpx.Client, confined: Server) -> Path:
    """A file of another session, with a secret in it."""
    other = _session_dir(confined, new_session(client))
    secret = other / "notes.txt"
    secret.write_text(f"neighbour {SECRET}\n")
    return secret


def test_file_tools_cannot_leave_the_session(
    client: httpx.Client, llm: FakeLLMProc, confined: Server, neighbour: Path
) -> None:
    sid = new_session(client)
    own = _session_dir(confined, sid)
    (own / "link").symlink_to(neighbour)
    (own / "etc").symlink_to("/etc")
    attempts = [
        ("Read", {"file_path": str(neighbour)}),
        ("Read", {"file_path": f"../{neighbour.parent.name}/{neighbour.name}"}),
        ("Read", {"file_path": str(own / ".." / neighbour.parent.name / neighbour.name)}),
        ("Read", {"file_path": str(own / "link")}),
        ("Read", {"file_path": "link"}),
        ("Read", {"file_path": str(own / "etc" / "hostname")}),
        ("Write", {"file_path": str(neighbour), "content": "overwritten"}),
        ("Glob", {"pattern": "*", "path": str(neighbour.parent)}),
        ("Glob", {"pattern": f"../{neighbour.parent.name}/*"}),
        ("Grep", {"pattern": SECRET, "path": str(confined.sandbox)}),
    ]
    for tool, args in attempts:
        sse, text, is_error = _call(client, llm, sid, tool, args)
        assert is_error, (tool, args, text)
        _assert_no_secret(text)
        assert "outside this session's directory" in text, (tool, args, text)
        (failed,) = [c for c in sse.chunks if c["type"] == "tool-output-error"]
        assert "outside this session's directory" in failed["errorText"]
    assert neighbour.read_text() == f"neighbour {SECRET}\n"


@pytest.mark.parametrize(
    "command",
    [
        "cat {neighbour}",
        "cat ../{other}/notes.txt",
        "ls {sandbox}",
        "cat {own}/link",
        "echo overwritten > {neighbour}",
        "grep -rl {secret} {sandbox} /tmp 2>/dev/null; echo searched",
    ],
)
def test_bash_cannot_reach_other_sessions(
    client: httpx.Client, llm: FakeLLMProc, confined: Server, neighbour: Path, command: str
) -> None:
    sid = new_session(client)
    own = _session_dir(confined, sid)
    (own / "link").symlink_to(neighbour)
    filled = command.format(
        neighbour=neighbour,
        other=neighbour.parent.name,
        sandbox=confined.sandbox,
        own=own,
        secret=SECRET,
    )
    _, text, _ = _call(client, llm, sid, "Bash", {"command": filled})
    _assert_no_secret(text)
    if command.startswith("ls"):
        assert neighbour.parent.name not in text and sid in text, text
    assert neighbour.read_text() == f"neighbour {SECRET}\n"


def test_bash_cannot_write_outside_the_session(
    client: httpx.Client, llm: FakeLLMProc, confined: Server
) -> None:
    name = f"escaped-{uuid.uuid4().hex}"
    targets = [confined.tmp / name, Path("/usr") / name, Path("/tmp") / name]
    sid = new_session(client)
    command = f"touch {' '.join(map(str, targets))}; echo done"
    try:
        _, text, _ = _call(client, llm, sid, "Bash", {"command": command})
        assert "done" in text
        assert "Read-only file system" in text  # /usr
        assert [t for t in targets if t.exists()] == []  # /tmp is the sandbox's own
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_tools_work_inside_the_session(
    client: httpx.Client, llm: FakeLLMProc, confined: Server
) -> None:
    sid = new_session(client)
    own = _session_dir(confined, sid)
    word = uuid.uuid4().hex
    _, text, is_error = _call(
        client, llm, sid, "Bash", {"command": f"mkdir -p sub && echo {word} > sub/mine.txt && pwd"}
    )
    assert not is_error and str(own) in text, text
    assert (own / "sub" / "mine.txt").read_text() == f"{word}\n"
    for path in (str(own / "sub" / "mine.txt"), "sub/mine.txt", "./sub/../sub/mine.txt"):
        _, text, is_error = _call(client, llm, sid, "Read", {"file_path": path})
        assert not is_error and word in text, (path, text)
    _, text, is_error = _call(client, llm, sid, "Glob", {"pattern": "**/*.txt"})
    assert not is_error and "mine.txt" in text, text
    _, text, is_error = _call(client, llm, sid, "Grep", {"pattern": word, "output_mode": "content"})
    assert not is_error and word in text, text


# -- machines that cannot confine Bash ------------------------------------------------


def test_bash_without_bubblewrap_refuses_to_start(tmp_path: Path) -> None:
    require_claude_sdk()
    r = subprocess.run(
        [sys.executable, "-m", "turnrelay.cli", "serve", "--port", str(free_port())],
        env={
            "PATH": str(tmp_path),  # no bwrap on it
            "TURNRELAY_MODEL": "claude:fake",
            "TURNRELAY_CLAUDE_TOOLS": "Read,Bash",
            "TURNRELAY_SANDBOX_DIR": str(tmp_path / "sandbox"),
            "HOME": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "bubblewrap" in r.stderr and "Bash" in r.stderr and "Traceback" not in r.stderr
