"""`turnrelay serve` killed mid-turn and started again: the turn is retried.

Embedded mode keeps the queue and the event log in memory, so a restart loses
the broker message and the frames; the turn's row still says `running`. On
start the executor's sweeper re-publishes such orphans, and the next attempt
runs with a fresh log that opens with `data-stream-reset`: a reader resuming
with a cursor of the lost log is answered with that log from its reset and
rebuilds the message in-band.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import FakeLLMProc, free_port, read_sse, start
from turnrelay.api.cursor import parse_cursor

pytestmark = pytest.mark.slow


def serve(tmp: Path, llm: FakeLLMProc, port: int):  # type: ignore[no-untyped-def]
    proc = start(
        "serve-restart",
        ["serve", "--port", str(port)],
        tmp=tmp,
        env={
            "TURNRELAY_MODEL": "openai:fake",
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "unused",
        },
        health_url=f"http://127.0.0.1:{port}/health",
    )
    proc.url = f"http://127.0.0.1:{port}"
    return proc


def test_killed_serve_retries_the_turn_after_restart(tmp_path: Path, llm: FakeLLMProc) -> None:
    port = free_port()
    first = serve(tmp_path, llm, port)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        turn_id = client.post(
            f"/api/chat/sessions/{sid}/turns",
            json={"message": "orphan fake:tokens=30 fake:delay_ms=40"},
        ).json()["turn_id"]
        with client.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
            head = read_sse(r, stop_after=6)
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(5)
    second = serve(tmp_path, llm, port)
    try:
        with httpx.Client(base_url=second.url, timeout=30) as client:
            with client.stream(
                "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": head.ids[-1]}
            ) as r:
                assert r.status_code == 200
                resumed = read_sse(r)
            kinds = [c["type"] for c in resumed.chunks]
            assert resumed.done and kinds[0] == "data-stream-reset"
            # The retry jumped the sequence: nothing of the lost log is replayed as if it were new.
            cursors = [parse_cursor(i) for i in resumed.ids]
            assert all(c.turn_id == turn_id and c.seq > 1_000_000 for c in cursors)
            assert resumed.text() == " ".join(f"t{i}" for i in range(30))
            deadline = time.monotonic() + 30
            while client.get(f"/api/chat/sessions/{sid}").json()["active_turn"] is not None:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
            assert turn["status"] == "completed" and turn["attempt"] == 2
            with client.stream(
                "GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": turn_id}
            ) as r:
                whole = read_sse(r)
            assert whole.done and whole.text() == " ".join(f"t{i}" for i in range(30))
    finally:
        second.stop()
