"""Tools through the `openai` runtime: `turnrelay serve` and `turnrelay fake-llm` as processes."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import new_session
from tests.procs import SSE, FakeLLMProc, read_sse

pytestmark = pytest.mark.slow


def _turn(client: httpx.Client, sid: str, message: str) -> SSE:
    with client.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": message}) as r:
        assert r.status_code == 200
        return read_sse(r)


def _of(sse: SSE, kind: str) -> list[dict[str, Any]]:
    return [c for c in sse.chunks if c["type"] == kind]


def _requests_with(llm: FakeLLMProc, marker: str) -> list[dict[str, Any]]:
    return [r["body"] for r in llm.requests() if marker in json.dumps(r.get("body") or {})]


def test_a_tool_turn(client: httpx.Client, llm: FakeLLMProc) -> None:
    sid = new_session(client)
    marker = uuid.uuid4().hex[:8]
    sse = _turn(client, sid, f'{marker} fake:tool=calculate:{{"expression": "0.1 + 0.2"}}')
    assert sse.done and sse.chunks[-1]["type"] == "finish"
    (start,) = _of(sse, "tool-input-start")
    assert start["toolName"] == "calculate"
    assert _of(sse, "tool-input-delta")
    (available,) = _of(sse, "tool-input-available")
    assert available["toolCallId"] == start["toolCallId"]
    assert available["input"] == {"expression": "0.1 + 0.2"}
    (output,) = _of(sse, "tool-output-available")
    assert output == {
        "type": "tool-output-available",
        "toolCallId": start["toolCallId"],
        "output": {"expression": "0.1 + 0.2", "result": "0.3"},
    }
    assert sse.text() == 'Tool calculate returned: {"expression": "0.1 + 0.2", "result": "0.3"}'

    first, second = _requests_with(llm, marker)
    assert "calculate" in [t["function"]["name"] for t in first["tools"]]
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": start["toolCallId"],
        "content": '{"expression": "0.1 + 0.2", "result": "0.3"}',
    }

    assistant = client.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
    (part,) = [p for p in assistant["parts"] if p["type"] == "tool-calculate"]
    assert part["state"] == "output-available" and part["output"]["result"] == "0.3"
    assert assistant["status"] == "completed"


@pytest.mark.parametrize(
    ("directive", "error"),
    [
        (
            'fake:tool=calculate:{"expression": "1 / 0"}',
            "Tool 'calculate' failed: division by zero",
        ),
        ('fake:tool=calculate:{"expr": "1"}', "Invalid arguments for tool 'calculate'"),
        ("fake:tool=no_such_tool", "Unknown tool 'no_such_tool'"),
    ],
)
def test_tool_errors_are_tool_errors_and_the_turn_completes(
    client: httpx.Client, directive: str, error: str
) -> None:
    sid = new_session(client)
    sse = _turn(client, sid, f"try {directive}")
    (failed,) = _of(sse, "tool-output-error")
    assert failed["errorText"].startswith(error)
    assert sse.chunks[-1]["type"] == "finish" and not _of(sse, "error")
    assert error in sse.text()  # the model read the error and answered
    assistant = client.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
    assert assistant["status"] == "completed"
    (part,) = [p for p in assistant["parts"] if p["type"].startswith("tool-")]
    assert part["state"] == "output-error" and part["errorText"].startswith(error)
