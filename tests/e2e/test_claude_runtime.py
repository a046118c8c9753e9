"""Runtime `claude`: `turnrelay serve` runs the real bundled Claude Code CLI against
`turnrelay fake-llm` (Anthropic Messages API), all as real processes."""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import skip_or_fail
from tests.e2e.conftest import new_session
from tests.procs import SSE, FakeLLMProc, Proc, free_port, iter_sse, read_sse, start

pytestmark = pytest.mark.slow


def require_claude_sdk() -> None:
    """The `claude` extra carries the bundled CLI: skip locally, fail under CI."""
    if importlib.util.find_spec("claude_agent_sdk") is not None:
        return
    skip_or_fail("claude-agent-sdk is not installed: pip install -e '.[claude]'")


@pytest.fixture(scope="module")
def claude_server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    require_claude_sdk()
    tmp = tmp_path_factory.mktemp("serve-claude")
    home = tmp / "home"
    home.mkdir()
    port = free_port()
    proc = start(
        "serve-claude",
        ["serve", "--port", str(port)],
        tmp=tmp,
        env={
            "TURNRELAY_MODEL": "claude:fake",
            "TURNRELAY_SANDBOX_DIR": str(tmp / "sandbox"),
            "TURNRELAY_HEARTBEAT_INTERVAL": "0.5",
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{llm.port}",
            "ANTHROPIC_API_KEY": "sk-fake",
            # The CLI reads and writes its configuration under HOME: never the user's.
            "HOME": str(home),
            # A failed model call fails at once instead of after minutes of retries.
            "CLAUDE_CODE_MAX_RETRIES": "0",
        },
        health_url=f"http://127.0.0.1:{port}/health",
    )
    proc.url = f"http://127.0.0.1:{port}"
    yield proc
    proc.stop()


@pytest.fixture
def client(claude_server: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=claude_server.url, timeout=60) as c:
        yield c


def _turn(client: httpx.Client, sid: str, message: str) -> SSE:
    with client.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": message}) as r:
        assert r.status_code == 200
        sse = read_sse(r)
    assert sse.done
    return sse


def _of(sse: SSE, kind: str) -> list[dict[str, Any]]:
    return [c for c in sse.chunks if c["type"] == kind]


def _records_with(llm: FakeLLMProc, marker: str) -> list[dict[str, Any]]:
    return [r for r in llm.requests() if marker in json.dumps(r.get("body") or {})]


def _cli_processes(server: Proc) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(server.popen.pid).children(recursive=True):
        try:
            if "claude" in " ".join(child.cmdline()[:1]) or child.name() == "claude":
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_text_turn_streams_as_several_deltas(client: httpx.Client, llm: FakeLLMProc) -> None:
    marker = uuid.uuid4().hex[:8]
    first = len(llm.records())
    # A pause between the model's chunks: the executor coalesces deltas that arrive
    # while a log write is in flight, so an instant model may show fewer.
    sse = _turn(client, new_session(client), f"hello claude {marker} fake:delay_ms=30")
    assert sse.text() == f"Echo: hello claude {marker}"
    assert len(_of(sse, "text-delta")) >= 3
    types = [c["type"] for c in sse.chunks]
    assert types[:2] == ["start", "start-step"] and types[-2:] == ["finish-step", "finish"]
    usage = sse.chunks[-1]["messageMetadata"]["usage"]
    assert usage["inputTokens"] > 0 and usage["outputTokens"] > 0

    # What the CLI asked of the model endpoint during the turn: one streamed
    # Messages call, with turnrelay's tools and none of its own.
    requests = [r for r in llm.records()[first:] if r["event"] == "request"]
    assert [r["path"] for r in requests] == ["/v1/messages"]
    body = requests[0]["body"]
    assert body["model"] == "fake" and body["stream"] is True
    names = [t["name"] for t in body.get("tools", [])]
    assert "mcp__turnrelay__calculate" in names and "mcp__turnrelay__current_time" in names
    assert not {"Bash", "Read", "Write", "Edit", "WebFetch"} & set(names)


def test_a_tool_turn_through_mcp(client: httpx.Client, llm: FakeLLMProc) -> None:
    marker = uuid.uuid4().hex[:8]
    sid = new_session(client)
    sse = _turn(client, sid, f'{marker} fake:tool=calculate:{{"expression": "0.1 + 0.2"}}')
    (start_,) = _of(sse, "tool-input-start")
    assert start_["toolName"] == "calculate"
    assert "".join(c["inputTextDelta"] for c in _of(sse, "tool-input-delta"))
    (available,) = _of(sse, "tool-input-available")
    assert available["toolCallId"] == start_["toolCallId"]
    assert available["input"] == {"expression": "0.1 + 0.2"}
    (output,) = _of(sse, "tool-output-available")
    assert output["toolCallId"] == start_["toolCallId"]
    assert output["output"] == {"expression": "0.1 + 0.2", "result": "0.3"}
    assert sse.text() == 'Tool calculate returned: {"expression": "0.1 + 0.2", "result": "0.3"}'
    assert sse.chunks[-1]["type"] == "finish"

    called, answered = _records_with(llm, marker)
    assert called["body"]["messages"][-1]["role"] != "assistant"
    last = answered["body"]["messages"][-1]
    (result,) = [b for b in last["content"] if b.get("type") == "tool_result"]
    assert result["tool_use_id"] == start_["toolCallId"]
    assert json.loads(result["content"][0]["text"]) == {"expression": "0.1 + 0.2", "result": "0.3"}

    assistant = client.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
    (part,) = [p for p in assistant["parts"] if p["type"] == "tool-calculate"]
    assert part["state"] == "output-available"


def test_the_clis_bash_tool_is_unavailable(client: httpx.Client, llm: FakeLLMProc) -> None:
    target = Path(f"/tmp/turnrelay-bash-{uuid.uuid4().hex}")
    command = json.dumps({"command": f"touch {target}"})
    sse = _turn(client, new_session(client), f"run fake:tool=Bash:{command}")
    (available,) = _of(sse, "tool-input-available")
    assert available["toolName"] == "Bash"
    (failed,) = _of(sse, "tool-output-error")
    assert "No such tool available: Bash" in failed["errorText"]
    assert "No such tool available: Bash" in sse.text()  # what the model was told
    assert sse.chunks[-1]["type"] == "finish" and not _of(sse, "error")
    assert not target.exists()


@pytest.mark.parametrize(
    ("directive", "error"),
    [
        (
            'fake:tool=calculate:{"expression": "1 / 0"}',
            "Tool 'calculate' failed: division by zero",
        ),
        (
            'fake:tool=calculate:{"expression": 12}',
            "Invalid arguments for tool 'calculate': 12 is not of type 'string'",
        ),
        ("fake:tool=no_such_tool", "No such tool available: no_such_tool"),
    ],
)
def test_tool_errors_are_tool_errors_and_the_turn_completes(
    client: httpx.Client, directive: str, error: str
) -> None:
    sid = new_session(client)
    sse = _turn(client, sid, f"try {directive}")
    (failed,) = _of(sse, "tool-output-error")
    assert error in failed["errorText"]
    assert sse.chunks[-1]["type"] == "finish" and not _of(sse, "error")
    assert sse.text().startswith("Tool ")  # the model read the error and answered
    assistant = client.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
    assert assistant["status"] == "completed"


def test_a_second_turn_carries_the_first(client: httpx.Client, llm: FakeLLMProc) -> None:
    """Resumed from the stored transcript: the first turn reaches the model as real
    messages, and the system prompt carries no copy of it."""
    marker = uuid.uuid4().hex[:8]
    sid = new_session(client)
    _turn(client, sid, f"my name is {marker}")
    second = _turn(client, sid, f"what is my name? {marker}-2")
    assert second.text() == f"Echo: what is my name? {marker}-2"
    (request,) = [r for r in _records_with(llm, f"{marker}-2")]
    assert f"my name is {marker}" not in json.dumps(request["body"]["system"])
    # (the CLI adds a `system` message of its own: the environment it runs in)
    messages = [m for m in request["body"]["messages"] if m["role"] != "system"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert f"my name is {marker}" in json.dumps(messages[0]["content"])
    assert f"Echo: my name is {marker}" in json.dumps(messages[1]["content"])
    assert f"my name is {marker}" not in json.dumps(messages[2]["content"])


def test_heartbeats_while_the_cli_is_silent(client: httpx.Client) -> None:
    sse = _turn(client, new_session(client), "slow fake:tokens=2 fake:delay_ms=1500")
    # A silent CLI must not cost the turn its lease (a retry would show as
    # `data-turn-retry`), and the streamed step is shown once.
    assert "data-turn-retry" not in [c["type"] for c in sse.chunks]
    assert sse.text() == "t0 t1" and sse.pings >= 1


def test_cancel_mid_turn_leaves_no_cli_process(
    client: httpx.Client, claude_server: Proc, llm: FakeLLMProc
) -> None:
    marker = uuid.uuid4().hex[:8]
    sid = new_session(client)
    r = client.post(
        f"/api/chat/sessions/{sid}/turns",
        json={"message": f"{marker} fake:tokens=400 fake:delay_ms=50"},
    )
    assert r.status_code == 202
    deltas = 0
    with client.stream("GET", f"/api/chat/sessions/{sid}/stream") as s:
        for _, data in iter_sse(s):
            if data and json.loads(data)["type"] == "text-delta":
                deltas += 1
                if deltas == 3:
                    break
    assert _cli_processes(claude_server), "the turn runs in a CLI process"
    answer = client.post(f"/api/chat/sessions/{sid}/cancel")
    assert answer.status_code == 200 and answer.json()["cancelled"] is True
    deadline = time.monotonic() + 10  # the CLI may take a moment to be reaped
    while _cli_processes(claude_server):
        assert time.monotonic() < deadline, _cli_processes(claude_server)
        time.sleep(0.1)

    turn = client.get(f"/api/chat/sessions/{sid}/turns/{r.json()['turn_id']}").json()
    assert turn["status"] == "cancelled"
    (request,) = _records_with(llm, marker)
    closes = [
        c
        for c in llm.records()
        if c["event"] == "closed" and c["request_index"] == request["request_index"]
    ]
    assert closes and closes[0]["completed"] is False  # the model stream was dropped


def test_a_failed_model_call_fails_the_turn(client: httpx.Client) -> None:
    sid = new_session(client)
    sse = _turn(client, sid, "boom fake:error=500")
    (error,) = _of(sse, "error")
    assert "API Error: 500" in error["errorText"] and "fake error 500" in error["errorText"]
    assert [c["type"] for c in sse.chunks][-2:] == ["error", "finish"]
    assert sse.text() == ""  # the CLI's own account of the failure is not an answer
    turn_id = sse.ids[0].split(":")[0]
    turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
    assert turn["status"] == "failed" and "API Error: 500" in turn["error"]
