"""Tool approval: a turn pauses before a tool that needs the user's approval and
goes on once they answer. Real `turnrelay serve` (and, for the executor kill, a
real cluster) with the fake LLM calling the built-in `save_note`, whose own
record (the session's notes file) shows how often it really ran."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import running_cluster
from tests.procs import SSE, FakeLLMProc, Proc, read_sse, start_serve

pytestmark = pytest.mark.slow
AUTH = {"authorization": "Bearer tok-alice"}
TIMEOUT_S = 3  # TURNRELAY_APPROVAL_TIMEOUT of the server below


@pytest.fixture(scope="module")
def approval_server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    proc = start_serve(
        tmp_path_factory.mktemp("approval"),
        llm,
        {
            "TURNRELAY_API_KEYS": "tok-alice=alice,tok-bob=bob",
            "TURNRELAY_APPROVAL_TIMEOUT": f"{TIMEOUT_S}s",
            "TURNRELAY_SWEEP_INTERVAL": "300ms",
        },
    )
    yield proc
    proc.stop()


@pytest.fixture
def api(approval_server: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=approval_server.url, headers=AUTH, timeout=30) as c:
        yield c


def notes(sandbox: Path, sid: str) -> list[str]:
    path = sandbox / sid / "notes.md"
    return path.read_text().splitlines() if path.exists() else []


def sandbox_of(proc: Proc) -> Path:
    return proc.log_path.parent / ".turnrelay" / "sandbox"


def post_stream(client: httpx.Client, sid: str, body: dict[str, Any]) -> SSE:
    with client.stream("POST", f"/api/chat/sessions/{sid}/stream", json=body) as r:
        assert r.status_code == 200, r.read()
        return read_sse(r)


def get_stream(client: httpx.Client, sid: str, after: str | None = None) -> SSE:
    headers = {"Last-Event-ID": after} if after else {}
    with client.stream("GET", f"/api/chat/sessions/{sid}/stream", headers=headers) as r:
        assert r.status_code == 200, r.read()
        return read_sse(r)


def of(sse: SSE, kind: str) -> list[dict[str, Any]]:
    return [c for c in sse.chunks if c["type"] == kind]


def ask(client: httpx.Client, note: str) -> tuple[str, str, SSE]:
    """A turn whose model calls save_note: (session, turn, the stream up to the pause)."""
    sid = client.post("/api/chat/sessions").json()["id"]
    text = f"{uuid.uuid4().hex[:8]} fake:tool=save_note:{json.dumps({'text': note})}"
    with client.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": text}) as r:
        assert r.status_code == 200
        turn_id = r.headers["x-turn-id"]
        sse = read_sse(r)
    return sid, turn_id, sse


def assert_paused(sse: SSE) -> tuple[str, str]:
    """The stream of a pause: the call, its request, ``finish`` (tool-calls), [DONE]."""
    assert sse.done
    (call,) = of(sse, "tool-input-available")
    assert call["toolName"] == "save_note"
    (request,) = of(sse, "tool-approval-request")
    assert set(request) == {"type", "approvalId", "toolCallId"}
    assert request["toolCallId"] == call["toolCallId"]
    assert sse.chunks[-1] == {
        "type": "finish",
        "finishReason": "tool-calls",
        "messageMetadata": {"status": "awaiting_approval"},
    }
    assert not of(sse, "tool-output-available")
    return request["approvalId"], request["toolCallId"]


def answer(
    client: httpx.Client, sid: str, turn_id: str, approval_id: str, approved: bool, **extra: Any
) -> httpx.Response:
    decision = {"approval_id": approval_id, "approved": approved, **extra}
    return client.post(
        f"/api/chat/sessions/{sid}/turns/{turn_id}/approvals", json={"decisions": [decision]}
    )


def wait_status(
    client: httpx.Client, sid: str, turn_id: str, timeout: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
        if turn["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return dict(turn)
        time.sleep(0.1)


def requests_after(llm: FakeLLMProc, call_id: str) -> list[dict[str, Any]]:
    """The model requests that carry the answer to ``call_id``."""
    return [
        r["body"]
        for r in llm.requests()
        if any(
            m.get("role") == "tool" and m.get("tool_call_id") == call_id
            for m in (r.get("body") or {}).get("messages", [])
        )
    ]


def test_approved_the_tool_runs_once_and_the_turn_goes_on(
    api: httpx.Client, approval_server: Proc, llm: FakeLLMProc
) -> None:
    sid, turn_id, first = ask(api, "buy milk")
    approval_id, call_id = assert_paused(first)
    pause_cursor = first.ids[-1]

    # Waiting: nothing ran, the turn says so, and a reload shows the request again.
    assert notes(sandbox_of(approval_server), sid) == []
    turn = api.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
    assert turn["status"] == "running" and turn["waiting_for_approval"] is True
    (pending,) = turn["approvals"]
    assert pending["approval_id"] == approval_id and pending["status"] == "waiting"
    assert pending["tool_name"] == "save_note" and pending["input"] == {"text": "buy milk"}
    session = api.get(f"/api/chat/sessions/{sid}").json()
    assert session["active_turn"]["waiting_for_approval"] is True
    (part,) = [p for p in session["messages"][1]["parts"] if p["type"] == "tool-save_note"]
    assert part["state"] == "approval-requested" and part["approval"] == {"id": approval_id}
    replay = get_stream(api, sid)
    assert replay.chunks == first.chunks and replay.done
    at_pause = get_stream(api, sid, pause_cursor)
    assert at_pause.chunks == [] and at_pause.done

    r = answer(api, sid, turn_id, approval_id, True)
    assert r.status_code == 200, r.text
    assert r.json()["waiting"] is False
    assert [a["status"] for a in r.json()["approvals"]] == ["approved"]
    rest = get_stream(api, sid, pause_cursor)
    assert rest.done and rest.chunks[0]["type"] == "start"
    (output,) = of(rest, "tool-output-available")
    assert output["toolCallId"] == call_id and output["output"] == {"saved": True, "notes": 1}
    assert rest.text() == "Tool save_note returned: " + json.dumps({"saved": True, "notes": 1})
    assert rest.chunks[-1]["finishReason"] == "stop"
    assert wait_status(api, sid, turn_id)["status"] == "completed"

    # Ran once: its own record, and one model request carrying its result.
    assert notes(sandbox_of(approval_server), sid) == ["- buy milk"]
    (after,) = requests_after(llm, call_id)
    assert after["messages"][-1]["content"] == json.dumps({"saved": True, "notes": 1})
    stored = api.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
    (part,) = [p for p in stored["parts"] if p["type"] == "tool-save_note"]
    assert part["state"] == "output-available"
    assert part["approval"] == {"id": approval_id, "approved": True}
    # Answering again the same way is harmless; the other way is a conflict.
    assert answer(api, sid, turn_id, approval_id, True).status_code == 200
    r = answer(api, sid, turn_id, approval_id, False)
    assert r.status_code == 409 and r.json()["code"] == "approval_already_answered"


def test_denied_the_model_is_told_and_nothing_runs(
    api: httpx.Client, approval_server: Proc, llm: FakeLLMProc
) -> None:
    sid, turn_id, first = ask(api, "delete everything")
    approval_id, call_id = assert_paused(first)
    r = answer(api, sid, turn_id, approval_id, False, reason="not now")
    assert r.status_code == 200 and r.json()["approvals"][0]["reason"] == "not now"
    rest = get_stream(api, sid, first.ids[-1])
    assert of(rest, "tool-output-denied") == [{"type": "tool-output-denied", "toolCallId": call_id}]
    assert not of(rest, "tool-output-available")
    assert "The user denied this call of 'save_note': not now" in rest.text()
    assert wait_status(api, sid, turn_id)["status"] == "completed"
    assert notes(sandbox_of(approval_server), sid) == []
    (after,) = requests_after(llm, call_id)
    assert "denied" in after["messages"][-1]["content"]
    stored = api.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
    (part,) = [p for p in stored["parts"] if p["type"] == "tool-save_note"]
    assert part["state"] == "output-denied"
    assert part["approval"] == {"id": approval_id, "approved": False, "reason": "not now"}


def test_unanswered_in_time_counts_as_denied(api: httpx.Client, approval_server: Proc) -> None:
    sid, turn_id, first = ask(api, "later")
    approval_id, _ = assert_paused(first)
    turn = wait_status(api, sid, turn_id, timeout=TIMEOUT_S + 15)
    assert turn["status"] == "completed"
    (decided,) = turn["approvals"]
    assert decided["status"] == "denied"
    assert decided["reason"] == f"no answer within {TIMEOUT_S:g} s"
    rest = get_stream(api, sid, first.ids[-1])
    assert of(rest, "tool-output-denied") and f"no answer within {TIMEOUT_S:g} s" in rest.text()
    assert notes(sandbox_of(approval_server), sid) == []
    late = answer(api, sid, turn_id, approval_id, True)
    assert late.status_code == 409


def test_cancel_while_waiting_ends_the_turn_and_frees_the_session(
    api: httpx.Client, approval_server: Proc
) -> None:
    sid, turn_id, first = ask(api, "maybe")
    approval_id, call_id = assert_paused(first)
    r = api.post(f"/api/chat/sessions/{sid}/cancel")
    assert r.status_code == 200 and r.json() == {"cancelled": True, "turn_id": turn_id}
    turn = api.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
    assert turn["status"] == "cancelled" and turn["waiting_for_approval"] is False
    rest = get_stream(api, sid, first.ids[-1])
    assert [c["type"] for c in rest.chunks] == ["abort", "finish"] and rest.done
    stored = api.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
    (part,) = [p for p in stored["parts"] if p["type"] == "tool-save_note"]
    assert part["state"] == "output-denied" and part["approval"]["reason"] == "cancelled"
    r = answer(api, sid, turn_id, approval_id, True)
    assert r.status_code == 409 and r.json()["code"] == "turn_not_waiting"
    # The session is free: the next message runs at once.
    nxt = post_stream(api, sid, {"message": "next fake:tokens=3"})
    assert nxt.text() == "t0 t1 t2"
    time.sleep(TIMEOUT_S + 1)  # the sweeper's expiry leaves a cancelled turn alone
    assert api.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()["status"] == "cancelled"
    assert notes(sandbox_of(approval_server), sid) == []
    del call_id


def test_the_ai_sdk_body_answers_and_streams_the_rest(
    api: httpx.Client, approval_server: Proc
) -> None:
    """What the AI SDK's Chat sends after addToolApprovalResponse: the chat's
    messages, the last the assistant's with the answered request."""
    sid, turn_id, first = ask(api, "via the chat")
    approval_id, call_id = assert_paused(first)
    session = api.get(f"/api/chat/sessions/{sid}").json()
    user, assistant = session["messages"]
    parts = [
        {**p, "state": "approval-responded", "approval": {"id": approval_id, "approved": True}}
        if p["type"] == "tool-save_note"
        else p
        for p in assistant["parts"]
    ]
    body = {
        "id": sid,
        "trigger": "submit-message",
        "messageId": assistant["id"],
        "messages": [
            {
                "id": user["id"],
                "role": "user",
                "parts": [{"type": "text", "text": user["content"]}],
            },
            {"id": assistant["id"], "role": "assistant", "parts": parts},
        ],
    }
    rest = post_stream(api, sid, body)
    assert rest.chunks[0] == {"type": "start", "messageId": assistant["id"]}
    (output,) = of(rest, "tool-output-available")
    assert output["toolCallId"] == call_id
    assert rest.chunks[-1]["finishReason"] == "stop" and rest.done
    assert notes(sandbox_of(approval_server), sid) == ["- via the chat"]
    # Sent again (a retry of the request): the same rest of the turn, nothing run again.
    again = post_stream(api, sid, body)
    assert again.chunks == rest.chunks
    assert notes(sandbox_of(approval_server), sid) == ["- via the chat"]
    assert wait_status(api, sid, turn_id)["status"] == "completed"


def test_bad_answers_get_clear_errors(api: httpx.Client) -> None:
    bob_token = "tok-bob"
    sid, turn_id, first = ask(api, "x")
    approval_id, _ = assert_paused(first)
    url = f"/api/chat/sessions/{sid}/turns/{turn_id}/approvals"
    cases: list[tuple[Any, int, str]] = [
        ({"decisions": []}, 400, "invalid_body"),
        ({"decisions": [{"approval_id": approval_id}]}, 400, "invalid_body"),
        ({"decisions": [{"approval_id": approval_id, "approved": "yes"}]}, 400, "invalid_body"),
        ({"decisions": [{"approval_id": "../x", "approved": True}]}, 400, "invalid_body"),
        (
            {"decisions": [{"approval_id": approval_id, "approved": True, "reason": "r" * 501}]},
            400,
            "invalid_body",
        ),
        (
            {"decisions": [{"approval_id": "approval_nope", "approved": True}]},
            404,
            "approval_not_found",
        ),
        (
            {"decisions": [{"approval_id": approval_id, "approved": True}] * 101},
            400,
            "invalid_body",
        ),
    ]
    for body, status, code in cases:
        r = api.post(url, json=body)
        assert (r.status_code, r.json()["code"]) == (status, code), (body, r.text)
    r = api.post(url, content=b"{not json")
    assert r.status_code == 400 and r.json()["code"] == "invalid_json"
    r = api.post(url, content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # Another user's turn is not found; an unknown turn neither.
    with httpx.Client(
        base_url=str(api.base_url), headers={"authorization": f"Bearer {bob_token}"}
    ) as bob:
        r = bob.post(url, json={"decisions": [{"approval_id": approval_id, "approved": True}]})
        assert r.status_code == 404
    r = api.post(
        f"/api/chat/sessions/{sid}/turns/{uuid.uuid4()}/approvals",
        json={"decisions": [{"approval_id": approval_id, "approved": True}]},
    )
    assert r.status_code == 404 and r.json()["code"] == "turn_not_found"
    # None of that answered it.
    assert api.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()["waiting_for_approval"]
    # A turn that never asked: 409.
    plain = api.post("/api/chat/sessions").json()["id"]
    with api.stream("POST", f"/api/chat/sessions/{plain}/stream", json={"message": "hi"}) as r:
        plain_turn = r.headers["x-turn-id"]
        read_sse(r)
    r = api.post(
        f"/api/chat/sessions/{plain}/turns/{plain_turn}/approvals",
        json={"decisions": [{"approval_id": approval_id, "approved": True}]},
    )
    assert r.status_code == 409 and r.json()["code"] == "turn_not_waiting"
    assert api.post(f"/api/chat/sessions/{sid}/cancel").json()["cancelled"] is True


def test_a_turn_waiting_when_its_executor_is_killed_goes_on_elsewhere(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """kill -9 the executor that paused the turn; the answer sent afterwards is
    carried out by another executor, and the tool runs once."""
    with running_cluster(tmp_path_factory.mktemp("approval-kill"), apis=1, executors=1) as cluster:
        first_executor = cluster.executors[0]
        with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as client:
            sid, turn_id, first = ask(client, "survive")
            approval_id, call_id = assert_paused(first)
            first_executor.popen.send_signal(signal.SIGKILL)
            first_executor.popen.wait(5)
            second = cluster.start_executor()
            r = answer(client, sid, turn_id, approval_id, True)
            assert r.status_code == 200, r.text
            rest = get_stream(client, sid, first.ids[-1])
            (output,) = of(rest, "tool-output-available")
            assert output["output"] == {"saved": True, "notes": 1}
            assert rest.chunks[-1]["finishReason"] == "stop"
            turn = wait_status(client, sid, turn_id)
            assert turn["status"] == "completed" and turn["attempt"] == 2
        assert cluster.finished_turns(second) == 1
        assert notes(cluster.tmp / ".turnrelay" / "sandbox", sid) == ["- survive"]
        assert len(requests_after(cluster.llm, call_id)) == 1


def test_a_continuation_retried_after_a_kill_resends_the_message_up_to_the_pause(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """kill -9 mid-continuation: the retry goes on from the pause (the tool runs
    again: tools are at-least-once) and, since readers start the message over
    at its data-turn-retry, re-sends the message up to the pause first."""
    with running_cluster(tmp_path_factory.mktemp("approval-retry"), apis=1, executors=2) as cluster:
        with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as client:
            sid = client.post("/api/chat/sessions").json()["id"]
            text = 'slow fake:tool=save_note:{"text": "twice"} fake:delay_ms=400'
            with client.stream(
                "POST", f"/api/chat/sessions/{sid}/stream", json={"message": text}
            ) as r:
                turn_id = r.headers["x-turn-id"]
                first = read_sse(r)
            approval_id, call_id = assert_paused(first)
            assert answer(client, sid, turn_id, approval_id, True).status_code == 200
            headers = {"Last-Event-ID": first.ids[-1]}
            with client.stream("GET", f"/api/chat/sessions/{sid}/stream", headers=headers) as r:
                seen = read_sse(r, stop_after=4)  # start, the output, text going
            victim = next(
                ex
                for ex in cluster.executors
                if httpx.get(f"{ex.url}/health").json()["active_turns"]
            )
            victim.popen.send_signal(signal.SIGKILL)
            victim.popen.wait(5)
            with client.stream(
                "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": seen.ids[-1]}
            ) as r:
                rest = read_sse(r)
            kinds = [c["type"] for c in rest.chunks]
            retry_at = kinds.index("data-turn-retry")
            # The message up to the pause, again, before the retry's own frames.
            resent = rest.chunks[retry_at + 1 :]
            assert [c["type"] for c in resent[:3]] == [
                "start-step",
                "tool-input-available",
                "tool-approval-request",
            ]
            assert resent[1]["toolCallId"] == call_id
            assert resent[2] == {
                "type": "tool-approval-request",
                "approvalId": approval_id,
                "toolCallId": call_id,
            }
            assert rest.chunks[-1]["finishReason"] == "stop"
            turn = wait_status(client, sid, turn_id)
            assert turn["status"] == "completed" and turn["attempt"] == 3
            stored = client.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
        (part,) = [p for p in stored["parts"] if p["type"] == "tool-save_note"]
        assert part["state"] == "output-available"
        # At-least-once: the continuation ran the tool, and so did its retry.
        assert len(notes(cluster.tmp / ".turnrelay" / "sandbox", sid)) == 2
