"""Start turnrelay's own processes for end-to-end tests: real binaries, real ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def start(
    name: str,
    args: list[str],
    *,
    env: dict[str, str],
    tmp: Path,
    health_url: str | None = None,
    timeout: float = 30.0,
) -> Proc:
    log_path = tmp / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TURNRELAY_")}
    full_env.update(env)
    popen = subprocess.Popen(
        [sys.executable, "-m", "turnrelay.cli", *args],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=tmp,
    )
    proc = Proc(name, popen, log_path)
    if health_url:
        deadline = time.monotonic() + timeout
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}:\n{proc.log()}")
            try:
                if httpx.get(health_url, timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"{name} did not become healthy:\n{proc.log()}")
            time.sleep(0.1)
    return proc


@dataclass
class FakeLLMProc:
    proc: Proc
    port: int
    record: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        lines = [json.loads(line) for line in self.record.read_text().splitlines() if line]
        return [line for line in lines if line.get("event") != "closed"]

    def records(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]


def start_fake_llm(tmp: Path) -> FakeLLMProc:
    port = free_port()
    record = tmp / "llm-requests.jsonl"
    proc = start(
        "fake-llm",
        ["fake-llm", "--port", str(port), "--record", str(record)],
        env={},
        tmp=tmp,
        health_url=f"http://127.0.0.1:{port}/v1/models",
    )
    return FakeLLMProc(proc, port, record)


@dataclass
class SSE:
    """One parsed SSE stream: (id, data) pairs and comment count."""

    events: list[tuple[str | None, str]] = field(default_factory=list)
    pings: int = 0

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(d) for _, d in self.events if d != "[DONE]"]

    @property
    def ids(self) -> list[str]:
        return [i for i, d in self.events if d != "[DONE]" and i is not None]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1][1] == "[DONE]"

    def text(self) -> str:
        return "".join(c["delta"] for c in self.chunks if c["type"] == "text-delta")


def iter_sse(response: httpx.Response) -> Iterator[tuple[str | None, str | None]]:
    """(id, data) per event; (None, None) per comment."""
    ident: str | None = None
    data: list[str] = []
    comment = False
    for line in response.iter_lines():
        if line == "":
            if data:
                yield ident, "\n".join(data)
            elif comment:
                yield None, None
            ident, data, comment = None, [], False
        elif line.startswith(":"):
            comment = True
        elif line.startswith("id:"):
            ident = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


def read_sse(response: httpx.Response, *, stop_after: int | None = None) -> SSE:
    sse = SSE()
    for ident, data in iter_sse(response):
        if data is None:
            sse.pings += 1
            continue
        sse.events.append((ident, data))
        if stop_after is not None and len(sse.events) >= stop_after:
            break
    return sse


def start_serve(tmp: Path, llm: FakeLLMProc, env: dict[str, str] | None = None) -> Proc:
    """`turnrelay serve` on a free port with the fake LLM as its only model."""
    port = free_port()
    proc = start(
        "serve",
        ["serve", "--port", str(port)],
        tmp=tmp,
        env={
            "TURNRELAY_MODEL": "openai:fake",
            "TURNRELAY_MODELS": "openai:fake",
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "unused",
            "TURNRELAY_HEARTBEAT_INTERVAL": "0.5",
            **(env or {}),
        },
        health_url=f"http://127.0.0.1:{port}/health",
    )
    proc.url = f"http://127.0.0.1:{port}"
    return proc


def tokens(n: int) -> str:
    """The text the fake LLM streams for ``fake:tokens=n``: ``t0 t1 … t{n-1}``."""
    return " ".join(f"t{i}" for i in range(n))
