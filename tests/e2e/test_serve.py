"""`turnrelay serve` and `turnrelay fake-llm` as real processes, driven over HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import new_session
from tests.procs import FakeLLMProc, read_sse

pytestmark = pytest.mark.slow


def requests_for(llm: FakeLLMProc, marker: str) -> list[dict]:
    return [
        r for r in llm.requests() if marker in json.dumps((r.get("body") or {}).get("messages", []))
    ]


def user_texts(request: dict) -> list[tuple[str, str]]:
    body = request["body"]
    return [(m["role"], m["content"]) for m in body["messages"] if m["role"] != "system"]


def test_two_turn_conversation(client: httpx.Client, llm: FakeLLMProc) -> None:
    sid = new_session(client)
    replies = []
    for text in ("first question c2t", "second question c2t"):
        with client.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": text}) as r:
            assert r.status_code == 200
            assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
            sse = read_sse(r)
        assert sse.done
        assert sse.chunks[0]["type"] == "start"
        assert sse.chunks[-1]["type"] == "finish"
        replies.append(sse.text())
    assert replies == ["Echo: first question c2t", "Echo: second question c2t"]

    session = client.get(f"/api/chat/sessions/{sid}").json()
    assert [(m["role"], m["content"], m["status"]) for m in session["messages"]] == [
        ("user", "first question c2t", "completed"),
        ("assistant", "Echo: first question c2t", "completed"),
        ("user", "second question c2t", "completed"),
        ("assistant", "Echo: second question c2t", "completed"),
    ]
    recorded = requests_for(llm, "c2t")
    assert len(recorded) == 2
    assert user_texts(recorded[1]) == [
        ("user", "first question c2t"),
        ("assistant", "Echo: first question c2t"),
        ("user", "second question c2t"),
    ]


def test_disconnect_and_resume_with_last_event_id(client: httpx.Client) -> None:
    sid = new_session(client)
    message = "resume me fake:tokens=40 fake:delay_ms=20"
    with client.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": message}) as r:
        first = read_sse(r, stop_after=8)  # then the client goes away mid-turn
    turn_id = first.ids[0].split(":")[0]
    time.sleep(0.2)  # the turn keeps running without a reader
    with client.stream(
        "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": first.ids[-1]}
    ) as r:
        assert r.status_code == 200
        rest = read_sse(r)
    assert rest.done
    with client.stream("GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": turn_id}) as r:
        whole = read_sse(r)
    assert whole.done
    assert first.events + rest.events == whole.events  # no gap, no repeat
    seqs = [int(i.split(":")[1]) for i in whole.ids]
    assert seqs == list(range(1, len(seqs) + 1))
    assert whole.text() == " ".join(f"t{i}" for i in range(40))
    assert len([c for c in whole.chunks if c["type"] == "text-delta"]) > 10  # really streamed
    assert client.get(f"/api/chat/sessions/{sid}/stream").status_code == 204


def test_reconnect_without_cursor_gets_running_turn_from_start(client: httpx.Client) -> None:
    sid = new_session(client)
    r = client.post(
        f"/api/chat/sessions/{sid}/turns", json={"message": "fake:tokens=20 fake:delay_ms=25"}
    )
    assert r.status_code == 202
    turn_id = r.json()["turn_id"]
    with client.stream("GET", f"/api/chat/sessions/{sid}/stream") as s:
        assert s.headers["x-turn-id"] == turn_id
        sse = read_sse(s)
    assert sse.done and sse.ids[0] == f"{turn_id}:1"
    assert sse.text() == " ".join(f"t{i}" for i in range(20))


def test_three_enqueued_turns_run_in_order(client: httpx.Client, llm: FakeLLMProc) -> None:
    sid = new_session(client)
    texts = [f"q{i} ordr fake:delay_ms=30" for i in range(3)]
    results: list[int] = []

    def submit(text: str) -> None:
        r = client.post(f"/api/chat/sessions/{sid}/turns", json={"message": text})
        results.append(r.status_code)

    threads = [threading.Thread(target=submit, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [202, 202, 202]
    deadline = time.monotonic() + 30
    while client.get(f"/api/chat/sessions/{sid}").json()["active_turn"] is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    session = client.get(f"/api/chat/sessions/{sid}").json()
    order = [m["content"] for m in session["messages"] if m["role"] == "user"]
    recorded = requests_for(llm, "ordr")
    assert len(recorded) == 3
    # Each request carries exactly the earlier turns, in the order the session ran them.
    for k, request in enumerate(recorded):
        history = user_texts(request)
        expected = []
        for earlier in order[:k]:
            expected += [("user", earlier), ("assistant", "Echo: " + earlier.split(" fake:")[0])]
        assert history == [*expected, ("user", order[k])]
    # One after another: each request arrived after the previous stream closed.
    closes = [r for r in llm.records() if r.get("event") == "closed"]
    starts = [r["t"] for r in recorded]
    ends = sorted(c["t"] for c in closes if c["t"] >= starts[0])
    for k in range(1, 3):
        assert any(starts[k - 1] <= e <= starts[k] for e in ends)


def test_model_failure_mid_turn(client: httpx.Client) -> None:
    sid = new_session(client)
    with client.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "break fake:tokens=10 fake:fail_after=3"},
    ) as r:
        sse = read_sse(r)
    types = [c["type"] for c in sse.chunks]
    assert types[-2:] == ["error", "finish"]
    assert sse.done
    partial = sse.text()
    assert partial.startswith("t0")
    session = client.get(f"/api/chat/sessions/{sid}").json()
    assistant = session["messages"][1]
    assert assistant["status"] == "failed"
    assert assistant["content"] == partial
    turn_id = sse.ids[0].split(":")[0]
    turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
    assert turn["status"] == "failed" and turn["error"]


def test_heartbeats_while_the_model_is_silent(client: httpx.Client) -> None:
    sid = new_session(client)
    client.post(f"/api/chat/sessions/{sid}/turns", json={"message": "fake:delay_ms=1200 slow a"})
    client.post(f"/api/chat/sessions/{sid}/turns", json={"message": "slow b"})
    with client.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
        sse = read_sse(r)
    assert sse.done and sse.pings >= 1


def test_operations_endpoints(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    text = client.get("/metrics").text
    assert "turnrelay_turns_finished_total" in text
    assert 'turnrelay_http_requests_total{route="create_session",status="201"}' in text


def test_serve_refuses_a_public_host_without_api_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "turnrelay.cli", "serve", "--host", "0.0.0.0"],
        env={"PATH": "/usr/bin:/bin", "TURNRELAY_MODEL": "openai:fake"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "TURNRELAY_API_KEYS" in r.stderr and "Traceback" not in r.stderr
