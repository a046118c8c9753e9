"""The user in control of the `claude` runtime: the real bundled Claude Code CLI
against the fake LLM, whose recorded requests are the model's view.

Tool approval: the CLI calls the built-in `save_note` (through turnrelay's MCP
server); the call is held, the CLI stopped and the turn paused; the
continuation, on any executor, resumes the CLI's own transcript of the pause
and tells it how the call went. The session's notes file shows how often the
tool really ran.

Steering: messages sent with `multitask: steer` while the CLI runs a tool loop
go into its streaming input while a step's tools run, and its next model
request carries them."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import running_cluster
from tests.e2e.test_claude_runtime import require_claude_sdk
from tests.e2e.test_steering import submit, wait_done, wait_for
from tests.e2e.test_tool_approval import (
    AUTH,
    answer,
    ask,
    assert_paused,
    get_stream,
    notes,
    of,
    wait_status,
)
from tests.procs import FakeLLMProc, Proc, free_port, start

pytestmark = pytest.mark.slow

CLAUDE_ENV = {
    "TURNRELAY_MODEL": "claude:fake",
    "ANTHROPIC_API_KEY": "sk-fake",
    "CLAUDE_CODE_MAX_RETRIES": "0",
    "TURNRELAY_API_KEYS": "tok-alice=alice",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    require_claude_sdk()
    tmp = tmp_path_factory.mktemp("claude-approval")
    (tmp / "home").mkdir()
    port = free_port()
    proc = start(
        "serve-claude-approval",
        ["serve", "--port", str(port)],
        tmp=tmp,
        env={
            **CLAUDE_ENV,
            "TURNRELAY_SANDBOX_DIR": str(tmp / "sandbox"),
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{llm.port}",
            "HOME": str(tmp / "home"),
        },
        health_url=f"http://127.0.0.1:{port}/health",
    )
    proc.url = f"http://127.0.0.1:{port}"
    yield proc
    proc.stop()


@pytest.fixture
def api(server: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def sandbox(server: Proc) -> Path:
    return server.log_path.parent / "sandbox"


def requests_with(llm: FakeLLMProc, marker: str) -> list[dict[str, Any]]:
    return [
        r["body"]
        for r in llm.requests()
        if marker in json.dumps(r.get("body") or {}) and (r.get("body") or {}).get("messages")
    ]


def last_user_text(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


def test_approved_the_cli_is_stopped_the_tool_runs_once_and_the_turn_goes_on(
    api: httpx.Client, server: Proc, llm: FakeLLMProc
) -> None:
    sid, turn_id, first = ask(api, "buy milk")
    approval_id, call_id = assert_paused(first)
    assert notes(sandbox(server), sid) == []  # held: the CLI's call never ran it
    turn = api.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
    assert turn["waiting_for_approval"] is True
    assert turn["approvals"][0]["input"] == {"text": "buy milk"}

    assert answer(api, sid, turn_id, approval_id, True).status_code == 200
    rest = get_stream(api, sid, first.ids[-1])
    (output,) = of(rest, "tool-output-available")
    assert output["toolCallId"] == call_id and output["output"] == {"saved": True, "notes": 1}
    assert rest.chunks[-1]["finishReason"] == "stop"
    assert wait_status(api, sid, turn_id)["status"] == "completed"
    assert notes(sandbox(server), sid) == ["- buy milk"]

    # The continuation resumed the CLI's own conversation: the model request
    # after the pause carries the turn's message and the call as real messages,
    # then what became of the call.
    (after,) = requests_with(llm, "It ran once and returned")
    kinds = [
        (m["role"], p.get("type"))
        for m in after["messages"]
        for p in (m["content"] if isinstance(m["content"], list) else [{"type": "text"}])
    ]
    assert ("assistant", "tool_use") in kinds and ("user", "tool_result") in kinds
    uses = [
        p
        for m in after["messages"]
        if isinstance(m["content"], list)
        for p in m["content"]
        if p.get("type") == "tool_use"
    ]
    assert [u["id"] for u in uses] == [call_id]
    assert "buy milk" in json.dumps(after["messages"][0])
    assert '{"saved": true, "notes": 1}' in last_user_text(after)
    stored = api.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
    (part,) = [p for p in stored["parts"] if p["type"] == "tool-save_note"]
    assert part["state"] == "output-available"
    assert part["approval"] == {"id": approval_id, "approved": True}


def test_denied_the_cli_is_told_and_nothing_runs(
    api: httpx.Client, server: Proc, llm: FakeLLMProc
) -> None:
    sid, turn_id, first = ask(api, "delete everything")
    approval_id, call_id = assert_paused(first)
    assert answer(api, sid, turn_id, approval_id, False, reason="not now").status_code == 200
    rest = get_stream(api, sid, first.ids[-1])
    assert of(rest, "tool-output-denied") == [{"type": "tool-output-denied", "toolCallId": call_id}]
    assert wait_status(api, sid, turn_id)["status"] == "completed"
    assert notes(sandbox(server), sid) == []
    (after,) = requests_with(llm, f"I denied your call of 'save_note' (id {call_id}) (not now)")
    assert "do not call it again" in last_user_text(after)


def test_a_second_turn_after_an_approval_carries_the_whole_first(
    api: httpx.Client, llm: FakeLLMProc
) -> None:
    sid, turn_id, first = ask(api, "remember eggs")
    approval_id, call_id = assert_paused(first)
    assert answer(api, sid, turn_id, approval_id, True).status_code == 200
    assert wait_status(api, sid, turn_id)["status"] == "completed"
    marker = "second-turn-marker"
    with api.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": marker}) as r:
        assert r.status_code == 200
        r.read()
    (body,) = requests_with(llm, marker)
    text = json.dumps(body["messages"])
    assert call_id in text and "remember eggs" in text and "It ran once and returned" in text


def test_a_turn_waiting_when_its_executor_is_killed_goes_on_elsewhere(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """kill -9 the executor that paused the turn (its CLI with it); another
    executor, with its own HOME, continues it from the stored transcript."""
    require_claude_sdk()
    tmp = tmp_path_factory.mktemp("claude-approval-kill")
    claude = {k: v for k, v in CLAUDE_ENV.items() if k != "TURNRELAY_API_KEYS"}
    with running_cluster(tmp, apis=1, executors=0, extra_env=claude) as cluster:

        def executor(name: str) -> Proc:
            # Its own HOME and sandbox: only object storage is shared.
            (tmp / name).mkdir()
            return cluster.start_executor(
                ANTHROPIC_BASE_URL=f"http://127.0.0.1:{cluster.llm.port}",
                HOME=str(tmp / name),
                TURNRELAY_SANDBOX_DIR=str(tmp / name / "sandbox"),
            )

        first_executor = executor("a")
        with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as client:
            sid, turn_id, first = ask(client, "survive")
            approval_id, call_id = assert_paused(first)
            first_executor.popen.send_signal(signal.SIGKILL)
            first_executor.popen.wait(5)
            second = executor("b")
            assert answer(client, sid, turn_id, approval_id, True).status_code == 200
            rest = get_stream(client, sid, first.ids[-1])
            (output,) = of(rest, "tool-output-available")
            assert output["output"] == {"saved": True, "notes": 1}
            turn = wait_status(client, sid, turn_id)
            assert turn["status"] == "completed" and turn["attempt"] == 2
        assert cluster.finished_turns(second) == 1
        assert notes(tmp / "b" / "sandbox", sid) == ["- survive"]
        (after,) = requests_with(cluster.llm, "It ran once and returned")
        assert call_id in json.dumps(after["messages"])


# steering ---------------------------------------------------------------------------

LOOP = "fake:tool=current_time fake:steps=4 fake:delay_ms=400"
# How the Claude Code CLI hands the model a message that arrived mid-turn.
SURFACED = "The user sent a new message while you were working:\n"


def texts(message: dict[str, Any]) -> list[str]:
    content = message["content"]
    if isinstance(content, str):
        return [content]
    return [str(p.get("text", "")) for p in content if p.get("type") == "text"]


def requests_opening(llm: FakeLLMProc, marker: str) -> list[dict[str, Any]]:
    return [
        r["body"]
        for r in llm.requests()
        if (r.get("body") or {}).get("messages") and marker in json.dumps(r["body"]["messages"][:1])
    ]


def steers_in(body: dict[str, Any]) -> list[str]:
    """The steering messages the CLI gave the model, as it words them."""
    found = []
    for message in body["messages"]:
        for text in texts(message):
            head, _, rest = text.partition(SURFACED)
            if not head and rest:
                found.append(rest.split("\n", 1)[0])
    return found


def test_steering_messages_reach_the_clis_next_request_in_order(
    api: httpx.Client, llm: FakeLLMProc
) -> None:
    sid = api.post("/api/chat/sessions").json()["id"]
    marker = f"loop-{uuid.uuid4().hex[:8]}"
    main = submit(api, sid, f"{marker} {LOOP}")
    steers = [f"steer {name} {uuid.uuid4().hex[:6]} fake:aside" for name in ("one", "two", "three")]
    for k, text in enumerate(steers, start=1):
        wait_for(f"request {k}", lambda k=k: len(requests_opening(llm, marker)) >= k)
        submit(api, sid, text, "steer")
        wait_for(f"request {k + 1}", lambda k=k: len(requests_opening(llm, marker)) >= k + 1)
    # After the last model request: no step can take it, so it is the next turn.
    wait_for("the last request", lambda: len(requests_opening(llm, marker)) >= 5)
    after = submit(api, sid, "after the end", "steer")
    assert wait_done(api, sid, main)["status"] == "completed"
    assert wait_done(api, sid, after)["status"] == "completed"

    requests = [r for r in requests_opening(llm, marker) if "after the end" not in json.dumps(r)]
    assert len(requests) == 5  # four tool steps and the answer
    for k, body in enumerate(requests):
        # Each steer in every request after it entered, once, in order; never before.
        assert steers_in(body) == steers[:k][:3], k
    # It entered with the step's tool result, before the next call.
    last = requests[1]["messages"]
    assert [p.get("type") for p in last[-2]["content"]] == ["tool_result"]
    assert steers_in({"messages": last[-1:]}) == steers[:1]

    session = api.get(f"/api/chat/sessions/{sid}").json()
    parts = session["messages"][1]["parts"]
    assert [p["data"]["text"] for p in parts if p["type"] == "data-steer"] == steers
    assert [(m["role"], m["content"]) for m in session["messages"][2:]] == [
        *[("user", t) for t in steers],
        ("user", "after the end"),
        ("assistant", "Echo: after the end"),
    ]
    turns = api.get(f"/api/chat/sessions/{sid}/turns/{after}").json()
    assert turns["steered_into"] is None
