"""Streams per user are capped; a cursor at a finished turn's end ends at once
(real `serve` process)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import new_session
from tests.procs import FakeLLMProc, Proc, read_sse, start_serve

LIMIT = 3


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    proc = start_serve(
        tmp_path_factory.mktemp("capped"),
        llm,
        {
            "TURNRELAY_API_KEYS": "tok-alice=alice,tok-bob=bob",
            "TURNRELAY_MAX_STREAMS_PER_USER": str(LIMIT),
        },
    )
    yield proc
    proc.stop()


def client_for(server: Proc, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, timeout=30, headers={"authorization": f"Bearer {token}"}
    )


def long_turn(client: httpx.Client) -> str:
    sid = new_session(client)
    r = client.post(
        f"/api/chat/sessions/{sid}/turns", json={"message": "fake:tokens=200 fake:delay_ms=50"}
    )
    assert r.status_code == 202
    return sid


def test_streams_beyond_the_cap_get_429_and_a_closed_one_frees_its_slot(capped: Proc) -> None:
    with client_for(capped, "tok-alice") as alice, client_for(capped, "tok-bob") as bob:
        sid = long_turn(alice)
        path = f"/api/chat/sessions/{sid}/stream"
        with contextlib.ExitStack() as stack:
            open_streams = []
            for _ in range(LIMIT):
                r = stack.enter_context(alice.stream("GET", path))
                assert r.status_code == 200
                open_streams.append(r)
            over = alice.get(path)
            assert over.status_code == 429
            assert over.json()["code"] == "too_many_streams"
            assert "3 of 3" in over.json()["detail"]
            # Another user is not affected by alice's streams.
            bob_sid = long_turn(bob)
            with bob.stream("GET", f"/api/chat/sessions/{bob_sid}/stream") as r:
                assert r.status_code == 200
            # Each open stream really streams.
            for r in open_streams:
                assert next(r.iter_lines()) is not None
        # All closed: the slots are free again (the server notices the disconnects).
        deadline = time.monotonic() + 10
        while True:
            with alice.stream("GET", path) as s:
                if s.status_code == 200:
                    break
                assert s.status_code == 429
            assert time.monotonic() < deadline, "closed streams kept their slots"
            time.sleep(0.2)
        alice.post(f"/api/chat/sessions/{sid}/cancel")


def test_resuming_at_a_finished_turns_last_frame_ends_at_once(capped: Proc) -> None:
    with client_for(capped, "tok-alice") as alice:
        sid = new_session(alice)
        with alice.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": "hi"}) as r:
            whole = read_sse(r)
        assert whole.done
        last = whole.ids[-1]
        started = time.monotonic()
        with alice.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", headers={"last-event-id": last}, timeout=5
        ) as r:
            assert r.status_code == 200
            body = r.read()
        assert body == b"data: [DONE]\n\n"
        assert time.monotonic() - started < 5  # not a ping loop cut by the timeout
        # One frame before the end still replays that frame, then [DONE].
        seq = int(last.rpartition(":")[2])
        before = f"{last.rpartition(':')[0]}:{seq - 1}"
        with alice.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", headers={"last-event-id": before}
        ) as r:
            tail = read_sse(r)
        assert tail.done and tail.ids == [last]
