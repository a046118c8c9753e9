"""Steering: messages sent with `multitask: steer` while a turn runs go into
that turn, before its next model request (real `serve`, a real cluster for
the kill -9, and the fake LLM's recorded requests as the model's view)."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import running_cluster
from tests.procs import FakeLLMProc, Proc, read_sse

pytestmark = pytest.mark.slow
AUTH = {"authorization": "Bearer tok-alice"}
LOOP = "fake:tool=current_time fake:steps=4 fake:delay_ms=400"


def requests_of(llm: FakeLLMProc, marker: str) -> list[dict[str, Any]]:
    return [
        r
        for r in llm.requests()
        if any(
            m.get("role") == "user" and marker in str(m.get("content"))
            for m in (r.get("body") or {}).get("messages", [])
        )
    ]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def user_texts(request: dict[str, Any]) -> list[str]:
    body = request.get("body") or {}
    return [str(m["content"]) for m in body.get("messages", []) if m["role"] == "user"]


def submit(client: httpx.Client, sid: str, text: str, multitask: str = "enqueue") -> str:
    r = client.post(
        f"/api/chat/sessions/{sid}/turns", json={"message": text, "multitask": multitask}
    )
    assert r.status_code == 202, r.text
    return str(r.json()["turn_id"])


def wait_done(client: httpx.Client, sid: str, turn_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        turn = dict(client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json())
        if turn["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return turn
        time.sleep(0.1)


def test_steering_messages_reach_the_next_request_in_order(
    client: httpx.Client, llm: FakeLLMProc
) -> None:
    sid = client.post("/api/chat/sessions").json()["id"]
    marker = f"loop-{uuid.uuid4().hex[:8]}"
    main = submit(client, sid, f"{marker} {LOOP}")
    steers = [f"steer {name} {uuid.uuid4().hex[:6]} fake:aside" for name in ("one", "two", "three")]
    for k, text in enumerate(steers, start=1):
        # Sent while model request k streams: request k + 1 must carry it.
        wait_for(f"request {k}", lambda k=k: len(requests_of(llm, marker)) >= k)
        submit(client, sid, text, "steer")
        wait_for(f"request {k + 1}", lambda k=k: len(requests_of(llm, marker)) >= k + 1)
    # After the last model request: no step can take it, so it is the next turn.
    wait_for("the last request", lambda: len(requests_of(llm, marker)) >= 5)
    after = submit(client, sid, "after the end", "steer")

    assert wait_done(client, sid, main)["status"] == "completed"
    assert wait_done(client, sid, after)["status"] == "completed"
    # (the next turn's request carries this turn as history: not one of its own)
    requests = [r for r in requests_of(llm, marker) if "after the end" not in user_texts(r)]
    assert len(requests) == 5  # four tool steps and the answer
    for k, request in enumerate(requests):
        texts = user_texts(request)
        assert texts[0].startswith(marker)
        # Each steer in every request after it entered, once, in order; never before.
        assert texts[1:] == steers[:k][:3], (k, texts)
    # It entered right after the step's tool result, before the next call.
    roles = [m["role"] for m in requests[1]["body"]["messages"]]
    assert roles[-3:] == ["assistant", "tool", "user"]

    for text in steers:
        entered = [r for r in llm.requests() if any(t == text for t in user_texts(r))]
        assert all(marker in user_texts(r)[0] for r in entered)  # only in that turn
    turns = {t: client.get(f"/api/chat/sessions/{sid}/turns/{t}").json() for t in (main, after)}
    assert turns[after]["steered_into"] is None
    session = client.get(f"/api/chat/sessions/{sid}").json()
    assistant = session["messages"][1]
    steered = [p["data"]["text"] for p in assistant["parts"] if p["type"] == "data-steer"]
    assert steered == steers
    # The history: the steering messages as user entries (no answer of their own),
    # then the message that came after the end with its own answer.
    assert [(m["role"], m["content"]) for m in session["messages"][2:]] == [
        *[("user", t) for t in steers],
        ("user", "after the end"),
        ("assistant", "Echo: after the end"),
    ]
    steer_turns = {m["turn_id"] for m in session["messages"][2:5]}
    for turn_id in steer_turns:
        turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
        assert (turn["status"], turn["steered_into"]) == ("completed", main)
    # Readers see where each one went in: a data-steer chunk in the stream.
    with client.stream("GET", f"/api/chat/sessions/{sid}/stream?turn_id={main}") as r:
        chunks = read_sse(r).chunks
    assert [c["data"]["text"] for c in chunks if c["type"] == "data-steer"] == steers


def test_a_steer_into_an_idle_session_is_a_plain_turn(client: httpx.Client) -> None:
    sid = client.post("/api/chat/sessions").json()["id"]
    turn = submit(client, sid, "alone", "steer")
    assert wait_done(client, sid, turn)["status"] == "completed"
    messages = client.get(f"/api/chat/sessions/{sid}").json()["messages"]
    assert [m["content"] for m in messages] == ["alone", "Echo: alone"]


def running_on(executors: list[Proc]) -> Proc:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for ex in executors:
            if ex.popen.poll() is None and httpx.get(f"{ex.url}/health").json()["active_turns"]:
                return ex
        time.sleep(0.05)
    raise AssertionError("no executor picked up the turn")


def test_no_steer_is_lost_or_doubled_when_the_executor_is_killed(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with running_cluster(tmp_path_factory.mktemp("steer-kill"), apis=1, executors=2) as cluster:
        llm = cluster.llm
        with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as client:
            sid = client.post("/api/chat/sessions").json()["id"]
            marker = f"kill-{uuid.uuid4().hex[:8]}"
            main = submit(client, sid, f"{marker} {LOOP}")
            first, second = (f"steer {n} {uuid.uuid4().hex[:6]} fake:aside" for n in "ab")
            wait_for("request 1", lambda: len(requests_of(llm, marker)) >= 1)
            submit(client, sid, first, "steer")
            wait_for("request 2", lambda: len(requests_of(llm, marker)) >= 2)
            submit(client, sid, second, "steer")
            wait_for("request 3", lambda: len(requests_of(llm, marker)) >= 3)
            victim = running_on(cluster.executors)
            killed_at = len(requests_of(llm, marker))
            victim.popen.send_signal(signal.SIGKILL)
            victim.popen.wait(5)
            turn = wait_done(client, sid, main)
            assert turn["status"] == "completed" and turn["attempt"] == 2
            session = client.get(f"/api/chat/sessions/{sid}").json()

        requests = requests_of(llm, marker)
        retry = requests[killed_at:]
        assert retry, "the retry made no model request"
        for request in retry:
            texts = user_texts(request)
            # Both, once each, in order, in every request of the retry.
            assert texts[1:] == [first, second], texts
        steered = [
            p["data"]["text"] for p in session["messages"][1]["parts"] if p["type"] == "data-steer"
        ]
        assert steered == [first, second]
        assert [m["content"] for m in session["messages"][2:]] == [first, second]
