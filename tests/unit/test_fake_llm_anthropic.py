"""The fake LLM server's Anthropic Messages API and its ``fake:tool=`` directive."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from turnrelay.devtools.fake_llm import FakeLLM, Script, build_app, parse_directives

TOOLS = [
    {"name": "mcp__turnrelay__current_time", "input_schema": {"type": "object"}},
    {"name": "other", "input_schema": {"type": "object"}},
]


def _body(*messages: dict[str, Any], stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": "fake",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "be brief"}],
        "messages": list(messages),
        "stream": stream,
        **extra,
    }


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


async def _events(response: httpx.Response) -> list[dict[str, Any]]:
    """The SSE events; each event's name must match its payload's ``type``."""
    events: list[dict[str, Any]] = []
    name = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            payload = json.loads(line.removeprefix("data: "))
            assert payload["type"] == name
            events.append(payload)
    return events


@pytest.fixture
async def asgi() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        yield client


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    record = tmp_path / "record.jsonl"
    async with FakeLLM(record_path=str(record)) as llm:
        base = llm.base_url.removesuffix("/v1")
        async with httpx.AsyncClient(base_url=base) as client:
            yield client, record


def test_tool_directive_takes_json_with_spaces() -> None:
    text, script = parse_directives('run fake:tool=Bash:{"command": "touch /tmp/x"} now')
    assert text == "run now"
    assert script == Script(tool="Bash", tool_args={"command": "touch /tmp/x"})
    assert parse_directives("fake:tool=current_time")[1].tool_args == {}
    with pytest.raises(ValueError, match="JSON object"):
        parse_directives("fake:tool=x:[1]")
    with pytest.raises(ValueError, match="JSON object"):
        parse_directives("fake:tool=x:{nope")


async def test_streamed_text(server: tuple[httpx.AsyncClient, Path]) -> None:
    client, record = server
    body = _body(_user("hello anthropic"), {"role": "system", "content": "ignored"})
    async with client.stream("POST", "/v1/messages", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await _events(response)
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["usage"]["input_tokens"] > 0
    assert events[2]["content_block"] == {"type": "text", "text": ""}
    texts = [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"]
    assert texts == ["Echo:", " hello", " anthropic"]
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    assert events[-2]["usage"]["output_tokens"] == 3
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(line["event"], line.get("path")) for line in lines] == [
        ("request", "/v1/messages"),
        ("closed", None),
    ]
    assert lines[0]["body"] == body and lines[1]["completed"] is True


async def test_tool_use_then_the_result(server: tuple[httpx.AsyncClient, Path]) -> None:
    client, _ = server
    ask = _user('time? fake:tool=current_time:{"timezone": "Europe/Paris"}')
    async with client.stream("POST", "/v1/messages", json=_body(ask, tools=TOOLS)) as response:
        events = await _events(response)
    (start,) = [e for e in events if e["type"] == "content_block_start"]
    block = start["content_block"]
    assert block["type"] == "tool_use" and block["name"] == "mcp__turnrelay__current_time"
    pieces = [
        e["delta"]["partial_json"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    ]
    assert len(pieces) >= 2
    assert json.loads("".join(pieces)) == {"timezone": "Europe/Paris"}
    assert next(e for e in events if e["type"] == "message_delta")["delta"]["stop_reason"] == (
        "tool_use"
    )

    called = {"role": "assistant", "content": [{**block, "input": {"timezone": "Europe/Paris"}}]}
    result = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": block["id"],
                "content": [{"type": "text", "text": "12:00"}],
            },
            {"type": "text", "text": "<system-reminder>not the user's text</system-reminder>"},
        ],
    }
    body = _body(ask, called, result, tools=TOOLS)
    async with client.stream("POST", "/v1/messages", json=body) as response:
        events = await _events(response)
    text = "".join(
        e["delta"]["text"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
    )
    assert text == "Tool current_time returned: 12:00"


async def test_a_tool_that_is_not_offered_is_called_by_its_name(asgi: httpx.AsyncClient) -> None:
    body = _body(_user('fake:tool=Bash:{"command": "ls"}'), stream=False, tools=TOOLS)
    message = (await asgi.post("/v1/messages", json=body)).json()
    assert message["stop_reason"] == "tool_use"
    (block,) = message["content"]
    assert (block["type"], block["name"], block["input"]) == ("tool_use", "Bash", {"command": "ls"})
    none = _body(_user("fake:tool=Bash"), stream=False, tool_choice={"type": "none"})
    assert (await asgi.post("/v1/messages", json=none)).json()["content"][0]["type"] == "text"


async def test_non_streaming_with_thinking(asgi: httpx.AsyncClient) -> None:
    body = _body(_user("fake:reasoning=2 fake:tokens=2"), stream=False)
    message = (await asgi.post("/v1/messages", json=body)).json()
    assert message["type"] == "message" and message["stop_reason"] == "end_turn"
    thinking, text = message["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "r0 r1"
    assert thinking["signature"]
    assert text == {"type": "text", "text": "t0 t1"}
    assert message["usage"]["output_tokens"] == 4


async def test_streamed_thinking(asgi: httpx.AsyncClient) -> None:
    async with asgi.stream(
        "POST", "/v1/messages", json=_body(_user("fake:reasoning=2 fake:tokens=1"))
    ) as response:
        events = await _events(response)
    kinds = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    assert kinds == ["thinking_delta", "thinking_delta", "signature_delta", "text_delta"]


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (429, "rate_limit_error"), (500, "api_error")],
)
async def test_errors_have_the_anthropic_shape(
    asgi: httpx.AsyncClient, status: int, kind: str
) -> None:
    response = await asgi.post("/v1/messages", json=_body(_user(f"fake:error={status}")))
    assert response.status_code == status
    assert response.json() == {
        "type": "error",
        "error": {"type": kind, "message": f"fake error {status} (fake:error directive)"},
    }
    assert (await asgi.post("/v1/messages", json={"messages": []})).status_code == 400


async def test_fail_after_breaks_the_stream(server: tuple[httpx.AsyncClient, Path]) -> None:
    client, record = server
    with pytest.raises(httpx.RemoteProtocolError):
        body = _body(_user("fake:tokens=5 fake:fail_after=2"))
        async with client.stream("POST", "/v1/messages", json=body) as response:
            await _events(response)
    last = json.loads(record.read_text().splitlines()[-1])
    assert last["event"] == "closed" and last["completed"] is False


async def test_count_tokens_and_unknown_paths_are_recorded(
    server: tuple[httpx.AsyncClient, Path],
) -> None:
    client, record = server
    counted = await client.post("/v1/messages/count_tokens", json=_body(_user("x" * 400)))
    assert counted.status_code == 200 and counted.json()["input_tokens"] >= 100
    missing = await client.post("/api/somewhere", json={"a": 1})
    assert missing.status_code == 404 and missing.json()["type"] == "error"
    paths = [json.loads(line)["path"] for line in record.read_text().splitlines()]
    assert paths == ["/v1/messages/count_tokens", "/api/somewhere"]
