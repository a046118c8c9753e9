"""A request body over the limit is refused while it arrives, so a client cannot
make the API hold it in memory (a real `turnrelay serve` process)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.procs import FakeLLMProc, Proc, start_serve

pytestmark = pytest.mark.slow

HUGE = 150 * 1024 * 1024
PIECE = b"x" * (256 * 1024)


@pytest.fixture(scope="module")
def lone_server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    """A server of its own: its memory is what this module measures."""
    proc = start_serve(tmp_path_factory.mktemp("serve-body"), llm)
    yield proc
    proc.stop()


def _pieces(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        piece = PIECE[: total - sent]
        sent += len(piece)
        yield piece


def _peak_rss(pid: int) -> int:
    """The process's peak resident set size so far (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def _reset_peak_rss(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _assert_too_large(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["code"] == "payload_too_large"
    assert body["detail"] and "Traceback" not in body["detail"]


def _session(url: str) -> str:
    r = httpx.post(f"{url}/api/chat/sessions", timeout=10)
    assert r.status_code == 201
    return str(r.json()["id"])


def test_a_huge_body_is_refused_without_growing_memory(lone_server: Proc) -> None:
    url = lone_server.url
    sid = _session(url)
    path = f"{url}/api/chat/sessions/{sid}/turns"
    ok = httpx.post(path, json={"message": "warm up"}, timeout=30)
    assert ok.status_code == 202
    pid = lone_server.popen.pid
    _reset_peak_rss(pid)
    before = psutil.Process(pid).memory_info().rss

    with httpx.Client(timeout=120) as client:
        declared = client.post(
            path,
            content=_pieces(HUGE),
            headers={"content-type": "application/json", "content-length": str(HUGE)},
        )
        _assert_too_large(declared)
        chunked = client.post(
            path, content=_pieces(HUGE), headers={"content-type": "application/json"}
        )
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        _assert_too_large(chunked)

    growth = _peak_rss(pid) - before
    assert growth < 30 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    # Nothing of the refused bodies was kept: the session still has one turn.
    messages = httpx.get(f"{url}/api/chat/sessions/{sid}", timeout=10).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]


def _raw(url: str, request: bytes, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """The status line and body of the answer to ``request`` sent as raw bytes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            (
                int(v)
                for k, _, v in (h.partition(b":") for h in lines[1:])
                if k.lower() == b"content-length"
            ),
            0,
        )
        while len(body) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
        return lines[0], body


def test_a_declared_oversize_is_refused_before_the_body_is_sent(lone_server: Proc) -> None:
    sid = _session(lone_server.url)
    head = (
        f"POST /api/chat/sessions/{sid}/turns HTTP/1.1\r\n"
        "Host: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {HUGE}\r\n\r\n"
    ).encode()
    # Only the head is sent: the answer comes without waiting for a single body byte.
    status, body = _raw(lone_server.url, head)
    assert status.startswith(b"HTTP/1.1 413"), status
    assert json.loads(body)["code"] == "payload_too_large"


def test_a_malformed_content_length_is_a_bad_request(lone_server: Proc) -> None:
    sid = _session(lone_server.url)
    head = (
        f"POST /api/chat/sessions/{sid}/turns HTTP/1.1\r\n"
        "Host: test\r\nContent-Type: application/json\r\n"
        "Content-Length: twelve\r\n\r\n"
    ).encode()
    # The HTTP server refuses it before the app sees it (read_body would too).
    status, _ = _raw(lone_server.url, head + json.dumps({"message": "hi"}).encode())
    assert status.startswith(b"HTTP/1.1 400"), status
