"""turnrelay's stream read by the AI SDK's own client (npm `ai`, Node).

`tests/interop/ai_sdk_client.mjs` runs `DefaultChatTransport` + `readUIMessageStream`
against a real `turnrelay serve` (with a real `turnrelay fake-llm` behind it) and prints the
message the SDK assembled, the chunks it parsed and the frames on the wire, each checked
against the SDK's `uiMessageChunkSchema` and the keys the SDK declares per chunk type.

The npm packages are installed by CI (`npm ci --prefix tests/interop`), never by the test:
without them the test skips locally and fails under ``CI``.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require_node_package
from tests.procs import FakeLLMProc, Proc, start_fake_llm, start_serve, tokens
from turnrelay.events import chunks as c
from turnrelay.lifecycle import terminal_chunks
from turnrelay.store.base import TurnStatus

pytestmark = [pytest.mark.node, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ai_sdk_client.mjs"
NODE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def node() -> str:
    return require_node_package(HERE, "ai")


@pytest.fixture(scope="module")
def llm(node: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLLMProc]:
    fake = start_fake_llm(tmp_path_factory.mktemp("llm"))
    yield fake
    fake.proc.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    proc = start_serve(tmp_path_factory.mktemp("serve"), llm)
    yield proc
    proc.stop()


@pytest.fixture
def client(server: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def new_session(client: httpx.Client) -> str:
    r = client.post("/api/chat/sessions")
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def run_sdk(
    node: str,
    server: Proc,
    sid: str,
    mode: str,
    when_ready: Callable[[], None] | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Run the Node client against the server once."""
    return run_node(
        node,
        {
            "mode": mode,
            "api": f"{server.url}/api/chat/sessions/{sid}/stream",
            "reconnectApi": f"{server.url}/api/chat/sessions/{sid}/stream",
            "sessionUrl": f"{server.url}/api/chat/sessions/{sid}",
            "chatId": sid,
            **config,
        },
        when_ready=when_ready,
    )


def run_node(
    node: str, config: dict[str, Any], *, when_ready: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Run the Node client once; fail the test with its output when it reports a problem.

    With ``when_ready`` the client loads the SDK first, then ``when_ready`` runs, then the
    client makes its request: Node's start-up time stays out of the timing.
    """
    full = {"timeoutMs": int(NODE_TIMEOUT * 1000 / 2), "handshake": when_ready is not None}
    full.update(config)
    proc = subprocess.Popen(
        [node, str(SCRIPT), json.dumps(full)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )
    try:
        if when_ready is not None:
            assert proc.stderr is not None and proc.stdin is not None
            ready = proc.stderr.readline()
            assert ready == "ready\n", f"the AI SDK client did not start: {ready!r}"
            when_ready()
            proc.stdin.write("go\n")
            proc.stdin.flush()
        stdout, stderr = proc.communicate(timeout=NODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the AI SDK client did not finish in {NODE_TIMEOUT} s: {stderr}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pytest.fail(
            f"the AI SDK client printed no result (exit {proc.returncode}):\n"
            f"stdout: {stdout}\nstderr: {stderr}"
        )
    assert proc.returncode == 0, (
        f"the AI SDK client failed: {stderr}\n"
        f"schema errors: {json.dumps(result.get('schemaErrors'), indent=1)}\n"
        f"undeclared keys: {json.dumps(result.get('undeclaredKeys'), indent=1)}\n"
        f"thrown: {result.get('thrown')}"
    )
    return result


def text_of(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


def assistant_entry(client: httpx.Client, sid: str) -> dict[str, Any]:
    session = client.get(f"/api/chat/sessions/{sid}").json()
    assistants = [m for m in session["messages"] if m["role"] == "assistant"]
    assert len(assistants) == 1, session["messages"]
    return dict(assistants[0])


def check_stream(result: dict[str, Any]) -> dict[str, Any]:
    """What every turn read through the SDK shares; returns the `start` chunk."""
    assert result["wire"]["status"] == 200
    assert result["wire"]["headers"]["x-vercel-ai-ui-message-stream"] == "v1"
    frames = result["wireFrames"]
    assert frames[-1]["data"] == "[DONE]"
    assert all(f["id"] for f in frames[:-1])  # every frame but [DONE] carries `id:`
    # Everything on the wire reached the SDK as a chunk, in order.
    assert [json.loads(f["data"]) for f in frames[:-1]] == result["chunks"]
    chunks = result["chunks"]
    assert chunks[0]["type"] == "start"
    assert chunks[-1]["type"] == "finish"
    message = result["message"]
    assert message is not None and result["snapshots"] > 1
    assert message["role"] == "assistant"
    assert message["id"] == chunks[0]["messageId"]
    return dict(chunks[0])


def test_submit_assembles_the_assistant_message(
    node: str, server: Proc, client: httpx.Client
) -> None:
    sid = new_session(client)
    words = " ".join(f"word{i}" for i in range(30))
    result = run_sdk(
        node,
        server,
        sid,
        "send",
        userMessageId=f"user-{uuid.uuid4()}",
        text=f"{words} fake:delay_ms=5",
    )
    check_stream(result)
    deltas = [c for c in result["chunks"] if c["type"] == "text-delta"]
    assert len(deltas) > 20
    message = result["message"]
    assert text_of(message) == f"Echo: {words}"
    assert [p["type"] for p in message["parts"]].count("text") == 1
    assert all(p.get("state") == "done" for p in message["parts"] if p["type"] == "text")
    assert result["sdkErrors"] == []
    entry = assistant_entry(client, sid)
    assert message["id"] == entry["id"]
    assert entry["content"] == f"Echo: {words}"
    # The transport's body ({id, messages, trigger, messageId}) became this turn's user message.
    user = client.get(f"/api/chat/sessions/{sid}").json()["messages"][0]
    assert (user["role"], user["content"]) == ("user", f"{words} fake:delay_ms=5")
    assert entry["status"] == "completed"
    assert message.get("metadata", {}).get("status") == "completed"


@pytest.mark.parametrize("replaced", ["last", "named"])
def test_regenerate_answers_again_instead_of_replaying_the_old_turn(
    node: str, server: Proc, client: httpx.Client, replaced: str
) -> None:
    """`Chat.regenerate()` resends the last user message (same id) with trigger
    'regenerate-message': that is a request for a new answer, not an idempotent
    repeat of the submit, and the new answer replaces the old one."""
    sid = new_session(client)
    user_id = f"user-{uuid.uuid4()}"
    first = run_sdk(node, server, sid, "send", userMessageId=user_id, text="regen me")
    old_id = check_stream(first)["messageId"]
    again = run_sdk(
        node,
        server,
        sid,
        "send",
        userMessageId=user_id,
        text="regen me",
        trigger="regenerate-message",
        messageId=old_id if replaced == "named" else None,
    )
    new_id = check_stream(again)["messageId"]
    assert new_id != old_id
    assert again["sdkErrors"] == []
    messages = client.get(f"/api/chat/sessions/{sid}").json()["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "regen me"),
        ("assistant", "Echo: regen me"),
    ]
    assert messages[1]["id"] == new_id and messages[1]["status"] == "completed"
    # The old turn stays readable, marked as replaced by the new one.
    old_turn_id = first["wireFrames"][0]["id"].split(":")[0]  # frame ids: <turn_id>:<seq>
    old_turn = client.get(f"/api/chat/sessions/{sid}/turns/{old_turn_id}")
    assert old_turn.json()["superseded_by"] == messages[1]["turn_id"]
    # a plain resubmit of the same message id still answers with the first turn
    repeat = run_sdk(node, server, sid, "send", userMessageId=user_id, text="regen me")
    assert check_stream(repeat)["messageId"] == old_id


def test_many_token_reply(node: str, server: Proc, client: httpx.Client) -> None:
    sid = new_session(client)
    result = run_sdk(
        node,
        server,
        sid,
        "send",
        userMessageId=f"user-{uuid.uuid4()}",
        text="count fake:tokens=30 fake:delay_ms=5",
    )
    check_stream(result)
    # Streamed as many deltas; the executor may coalesce deltas that arrive while
    # a log write is in flight, so the count is not exactly one per token.
    assert len([c for c in result["chunks"] if c["type"] == "text-delta"]) >= 10
    assert text_of(result["message"]) == " ".join(f"t{i}" for i in range(30))
    assert result["message"]["id"] == assistant_entry(client, sid)["id"]


def test_reasoning_turn_yields_a_reasoning_part(
    node: str, server: Proc, client: httpx.Client
) -> None:
    sid = new_session(client)
    result = run_sdk(
        node,
        server,
        sid,
        "send",
        userMessageId=f"user-{uuid.uuid4()}",
        text="think first fake:reasoning=5",
    )
    check_stream(result)
    parts = result["message"]["parts"]
    reasoning = [p for p in parts if p["type"] == "reasoning"]
    assert len(reasoning) == 1
    assert reasoning[0]["text"] == "r0 r1 r2 r3 r4"
    assert reasoning[0]["state"] == "done"
    assert text_of(result["message"]) == "Echo: think first"
    kinds = [p["type"] for p in parts if p["type"] in ("reasoning", "text")]
    assert kinds == ["reasoning", "text"]
    assert result["message"]["id"] == assistant_entry(client, sid)["id"]


def test_failed_turn_surfaces_the_error_chunk(
    node: str, server: Proc, client: httpx.Client
) -> None:
    sid = new_session(client)
    result = run_sdk(
        node,
        server,
        sid,
        "send",
        userMessageId=f"user-{uuid.uuid4()}",
        text="break fake:fail_after=3 fake:tokens=10",
        expectErrors=1,
    )
    check_stream(result)
    types = [c["type"] for c in result["chunks"]]
    assert types[-2:] == ["error", "finish"]
    error_text = result["chunks"][-2]["errorText"]
    assert error_text
    # readUIMessageStream hands the `error` chunk to onError as Error(errorText) and keeps
    # reading: the stream does not throw, and the message keeps the partial answer.
    assert result["sdkErrors"] == [error_text]
    entry = assistant_entry(client, sid)
    assert entry["status"] == "failed"
    assert result["message"]["id"] == entry["id"]
    partial = text_of(result["message"])
    assert partial.startswith("t0")
    assert partial == entry["content"]
    assert result["message"].get("metadata", {}).get("status") == "failed"


def test_reconnect_during_a_running_turn(node: str, server: Proc, client: httpx.Client) -> None:
    sid = new_session(client)
    started: dict[str, str] = {}

    def start_turn_and_wait_for_output() -> None:
        r = client.post(
            f"/api/chat/sessions/{sid}/turns", json={"message": "fake:tokens=40 fake:delay_ms=30"}
        )
        assert r.status_code == 202, r.text
        started["turn_id"] = r.json()["turn_id"]
        deadline = time.monotonic() + 10
        while True:  # reconnect once the turn has streamed something
            active = client.get(f"/api/chat/sessions/{sid}").json()["active_turn"]
            if active and active["status"] == "running" and active["last_event_id"]:
                return
            assert time.monotonic() < deadline, "the turn did not start streaming"
            time.sleep(0.02)

    result = run_sdk(node, server, sid, "reconnect", when_ready=start_turn_and_wait_for_output)
    turn_id = started["turn_id"]
    assert not result["noStream"]
    assert result["wire"]["url"] == f"{server.url}/api/chat/sessions/{sid}/stream"
    at_connect = result["activeTurnAtConnect"]
    assert at_connect is not None and at_connect["turn_id"] == turn_id
    assert at_connect["status"] == "running"  # really resumed mid-turn
    check_stream(result)
    assert result["wireFrames"][0]["id"] == f"{turn_id}:1"  # replayed from the first frame
    assert text_of(result["message"]) == " ".join(f"t{i}" for i in range(40))
    assert result["message"]["id"] == assistant_entry(client, sid)["id"]
    assert result["sdkErrors"] == []
    # Nothing runs any more: reconnectToStream answers null (204), as useChat expects.
    after = run_sdk(node, server, sid, "reconnect")
    assert after["noStream"] is True


# ---- every chunk builder, including those a fake-llm turn never produces ----


def builder_turn(ending: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A retried turn with reasoning, text and two tool calls, as turnrelay's builders write it."""
    return [
        c.start("msg-builders"),
        c.data("turn-retry", {"attempt": 2}, transient=True),
        c.start_step(),
        c.reasoning_start("r1"),
        c.reasoning_delta("r1", "let me look"),
        c.reasoning_end("r1"),
        c.tool_input_start("call-1", "search"),
        c.tool_input_delta("call-1", '{"q":'),
        c.tool_input_delta("call-1", '"x"}'),
        c.tool_input_available("call-1", "search", {"q": "x"}),
        c.tool_output_available("call-1", {"hits": 2}),
        c.tool_input_start("call-2", "fetch"),
        c.tool_input_available("call-2", "fetch", {"url": "u"}),
        c.tool_output_error("call-2", "fetch failed"),
        c.finish_step(),
        c.start_step(),
        c.text_start("t1"),
        c.text_delta("t1", "found "),
        c.text_delta("t1", "it"),
        c.text_end("t1"),
        c.data("note", {"k": 1}),
        c.finish_step(),
        *ending,
    ]


def test_every_builder_passes_the_sdk_schemas(node: str) -> None:
    usage = {"input_tokens": 3, "output_tokens": 5}
    chunks = builder_turn(terminal_chunks(TurnStatus.COMPLETED, None, usage))
    result = run_node(node, {"mode": "validate", "chunks": chunks})
    message = result["message"]
    assert message["id"] == "msg-builders"
    assert message["metadata"] == {"status": "completed", "usage": usage}
    parts = message["parts"]
    types = [p["type"] for p in parts]
    # the transient data-turn-retry is handed to onData only; data-note stays in the message
    assert "data-turn-retry" not in types
    assert [p["data"] for p in parts if p["type"] == "data-note"] == [{"k": 1}]
    assert [t for t in types if t != "step-start"] == [
        "reasoning",
        "tool-search",
        "tool-fetch",
        "text",
        "data-note",
    ]
    search = next(p for p in parts if p["type"] == "tool-search")
    assert (search["state"], search["input"], search["output"]) == (
        "output-available",
        {"q": "x"},
        {"hits": 2},
    )
    fetch = next(p for p in parts if p["type"] == "tool-fetch")
    assert (fetch["state"], fetch["errorText"]) == ("output-error", "fetch failed")
    assert text_of(message) == "found it"


@pytest.mark.parametrize(("status", "errors"), [(TurnStatus.FAILED, 1), (TurnStatus.CANCELLED, 0)])
def test_terminal_chunks_pass_the_sdk_schemas(node: str, status: TurnStatus, errors: int) -> None:
    ending = terminal_chunks(status, "the model went away" if errors else None)
    result = run_node(
        node, {"mode": "validate", "chunks": builder_turn(ending), "expectErrors": errors}
    )
    assert result["sdkErrors"] == (["the model went away"] if errors else [])
    assert result["message"]["metadata"] == {"status": status.value}
    assert text_of(result["message"]) == "found it"


CHAT_SCRIPT = HERE / "chat_class.mjs"


def test_the_sdks_chat_class_sends_regenerates_stops_and_resumes(
    node: str, server: Proc, client: httpx.Client
) -> None:
    """The AI SDK's own `Chat` engine (what `useChat` wraps) against real `serve`."""
    sid = new_session(client)
    long = "chat long fake:tokens=200 fake:delay_ms=20"
    resume = "chat resume fake:tokens=30 fake:delay_ms=20"
    config = {
        "api": f"{server.url}/api/chat/sessions/{sid}/stream",
        "cancelUrl": f"{server.url}/api/chat/sessions/{sid}/cancel",
        "chatId": sid,
        "first": "chat hello",
        "long": long,
        "resumeText": resume,
    }
    done = subprocess.run(
        [node, str(CHAT_SCRIPT), json.dumps(config)],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=NODE_TIMEOUT,
    )
    assert done.returncode == 0, f"{done.stderr}\n{done.stdout}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    steps = result["steps"]
    assert result["errors"] == []

    send = steps["send"]
    assert [(m["role"], m["text"]) for m in send["messages"]] == [
        ("user", "chat hello"),
        ("assistant", "Echo: chat hello"),
    ]
    assert send["status"] == "ready"
    assert send["finish"]["finishReason"] == "stop" and not send["finish"]["isAbort"]
    assert send["messages"][1]["metadata"]["status"] == "completed"

    # regenerate: the chat replaces its last answer with a new one (a new turn),
    # and so does the server: the session holds what the chat shows.
    regen = steps["regenerate"]
    assert [m["role"] for m in regen["messages"]] == ["user", "assistant"]
    assert regen["messages"][1]["text"] == "Echo: chat hello"
    assert regen["messages"][1]["id"] != send["messages"][1]["id"]
    on_server = client.get(f"/api/chat/sessions/{sid}").json()["messages"]
    assert on_server[1]["id"] == regen["messages"][1]["id"]
    assert [m["content"] for m in on_server][:2] == ["chat hello", "Echo: chat hello"]

    # stop, with turnrelay's cancel: the partial answer is kept, the turn cancelled.
    stop = steps["stop"]
    assert steps["cancelAnswer"]["cancelled"] is True
    assert stop["status"] == "ready"
    # (Chat's isAbort is about the client's own abort; the server's abort chunk shows
    # as the finish reason and the status in the finish's metadata.)
    assert stop["finish"]["finishReason"] == "other" and not stop["finish"]["isError"]
    assert stop["finish"]["metadata"] == {"status": "cancelled"}
    partial = stop["messages"][-1]["text"]
    assert 5 <= len(partial.split()) < 200 and tokens(200).startswith(partial)
    stored = client.get(f"/api/chat/sessions/{sid}/turns/{steps['cancelAnswer']['turn_id']}")
    assert stored.json()["status"] == "cancelled"

    # resume after a reload: the whole reply, once, from the turn's first frame.
    resumed = steps["resume"]
    assert [(m["role"], m["text"]) for m in resumed["messages"]] == [
        ("user", resume),
        ("assistant", tokens(30)),
    ]
    assert len(steps["resumeCutAt"].split()) < 30  # the first tab really left mid-reply
    assert resumed["finish"]["finishReason"] == "stop"


V6 = HERE / "v6"


@pytest.mark.parametrize("status", [TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.CANCELLED])
def test_every_chunk_passes_ai_sdk_6_too(status: TurnStatus) -> None:
    """Clients still on AI SDK 6: its own schema (no `interrupted` finish reason,
    for one) and stream reader take every chunk turnrelay writes."""
    node = require_node_package(V6, "ai")
    error = "the model went away" if status is TurnStatus.FAILED else None
    chunks = builder_turn(terminal_chunks(status, error, {"input_tokens": 1, "output_tokens": 2}))
    done = subprocess.run(
        [node, str(V6 / "validate.mjs"), json.dumps(chunks)],
        capture_output=True,
        text=True,
        cwd=V6,
        timeout=NODE_TIMEOUT,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["schemaErrors"] == [] and done.returncode == 0, done.stderr
    assert result["sdkErrors"] == ([error] if error else [])
    assert result["message"]["metadata"]["status"] == status.value
    assert text_of(result["message"]) == "found it"


APPROVAL_SCRIPT = HERE / "approval_chat.mjs"


def test_the_sdks_chat_class_answers_tool_approval_requests(
    node: str, server: Proc, client: httpx.Client
) -> None:
    """`addToolApprovalResponse` and `sendAutomaticallyWhen` against real `serve`:
    the chat gets the request, sends the answer, and shows the tool's outcome."""
    sid = new_session(client)
    config = {
        "api": f"{server.url}/api/chat/sessions/{sid}/stream",
        "chatId": sid,
        "approve": 'note fake:tool=save_note:{"text": "from the chat"}',
        "deny": 'note fake:tool=save_note:{"text": "never"}',
    }
    done = subprocess.run(
        [node, str(APPROVAL_SCRIPT), json.dumps(config)],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=NODE_TIMEOUT,
    )
    assert done.returncode == 0, f"{done.stderr}\n{done.stdout}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    steps = result["steps"]
    assert result["errors"] == []

    asked = steps["approveAsked"]["messages"][-1]
    assert asked["tool"]["state"] == "approval-requested"
    assert asked["tool"]["input"] == {"text": "from the chat"}
    assert asked["metadata"] == {"status": "awaiting_approval"}
    # What the chat sent back: no new user message, the answer in the assistant's parts.
    (request,) = steps["approveRequest"]
    assert request["trigger"] == "submit-message" and request["messageId"] == asked["id"]
    assert request["messages"][-1]["role"] == "assistant"
    approved = steps["approveDone"]["messages"]
    assert [m["role"] for m in approved] == ["user", "assistant"]
    assert approved[-1]["id"] == asked["id"]  # the same answer, continued
    assert approved[-1]["tool"]["state"] == "output-available"
    assert approved[-1]["tool"]["output"] == {"saved": True, "notes": 1}
    assert approved[-1]["text"] == 'Tool save_note returned: {"saved": true, "notes": 1}'

    denied = steps["denyDone"]["messages"]
    assert [m["role"] for m in denied] == ["user", "assistant", "user", "assistant"]
    assert denied[-1]["tool"]["state"] == "output-denied"
    assert denied[-1]["tool"]["approval"]["approved"] is False
    assert "denied" in denied[-1]["text"] and "not now" in denied[-1]["text"]

    # The server holds what the chat shows.
    stored = client.get(f"/api/chat/sessions/{sid}").json()["messages"]
    states = [
        next(p for p in m["parts"] if p["type"] == "tool-save_note")["state"]
        for m in stored
        if m["role"] == "assistant"
    ]
    assert states == ["output-available", "output-denied"]
    assert [m["status"] for m in stored] == ["completed"] * 4


def test_approval_and_steer_chunks_pass_ai_sdk_6_too() -> None:
    """A pause for approval, its continuation (one call approved, one denied) and
    a steer, through AI SDK 6's own schema and reader as one stream."""
    node = require_node_package(V6, "ai")
    chunks = [
        c.start("msg-approval"),
        c.start_step(),
        c.tool_input_start("call-1", "save_note"),
        c.tool_input_available("call-1", "save_note", {"text": "x"}),
        c.tool_approval_request("approval_1", "call-1"),
        c.tool_input_start("call-2", "save_note"),
        c.tool_input_available("call-2", "save_note", {"text": "y"}),
        c.tool_approval_request("approval_2", "call-2"),
        c.finish_step(),
        c.pause(),
        c.start("msg-approval"),
        c.tool_output_available("call-1", {"saved": True}),
        c.tool_output_denied("call-2"),
        c.data("steer", {"messageId": "m-2", "text": "and this"}),
        c.start_step(),
        c.text_start("t1"),
        c.text_delta("t1", "found it"),
        c.text_end("t1"),
        c.finish_step(),
        *terminal_chunks(TurnStatus.COMPLETED, None),
    ]
    done = subprocess.run(
        [node, str(V6 / "validate.mjs"), json.dumps(chunks)],
        capture_output=True,
        text=True,
        cwd=V6,
        timeout=NODE_TIMEOUT,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["schemaErrors"] == [] and done.returncode == 0, done.stderr
    assert result["sdkErrors"] == []
    parts = result["message"]["parts"]
    states = {p["toolCallId"]: p["state"] for p in parts if p["type"] == "tool-save_note"}
    assert states == {"call-1": "output-available", "call-2": "output-denied"}
    assert [p["data"] for p in parts if p["type"] == "data-steer"] == [
        {"messageId": "m-2", "text": "and this"}
    ]
    assert text_of(result["message"]) == "found it"
