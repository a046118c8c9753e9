"""The fake LLM server: OpenAI wire shapes, directives and the record file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from turnrelay.devtools.fake_llm import FakeLLM, Script, build_app, parse_directives


def _body(text: str, *, stream: bool = False, usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "fake",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "an older question"},
            {"role": "assistant", "content": "an older answer"},
            {"role": "user", "content": text},
        ],
    }
    if stream:
        body["stream"] = True
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _sse_payloads(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads, JSON-decoded except the final ``[DONE]``."""
    payloads: list[Any] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def _content(chunks: list[Any]) -> list[str]:
    return [
        c["choices"][0]["delta"]["content"]
        for c in chunks
        if isinstance(c, dict) and c["choices"] and c["choices"][0]["delta"].get("content")
    ]


@pytest.fixture
async def asgi() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        yield client


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    record = tmp_path / "record.jsonl"
    async with (
        FakeLLM(record_path=str(record)) as llm,
        httpx.AsyncClient(base_url=llm.base_url) as client,
    ):
        yield client, record


def test_directives_are_parsed_and_stripped() -> None:
    text, script = parse_directives("say  fake:tokens=3 hi fake:delay_ms=5 fake:fail_after=1")
    assert text == "say hi"
    assert script == Script(tokens=3, delay_ms=5, fail_after=1)
    with pytest.raises(ValueError, match="integer"):
        parse_directives("fake:tokens=many")


async def test_models(asgi: httpx.AsyncClient) -> None:
    response = await asgi.get("/v1/models")
    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == "fake"


async def test_non_streaming_echo(asgi: httpx.AsyncClient) -> None:
    response = await asgi.post("/v1/chat/completions", json=_body("hello there"))
    assert response.status_code == 200
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Echo: hello there",
    }
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["completion_tokens"] == 3


async def test_tokens_directive(asgi: httpx.AsyncClient) -> None:
    response = await asgi.post("/v1/chat/completions", json=_body("fake:tokens=4"))
    assert response.json()["choices"][0]["message"]["content"] == "t0 t1 t2 t3"


@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_error_directive(asgi: httpx.AsyncClient, status: int) -> None:
    response = await asgi.post(
        "/v1/chat/completions", json=_body(f"boom fake:error={status}", stream=True)
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert str(status) in error["message"]


async def test_bad_requests(asgi: httpx.AsyncClient) -> None:
    assert (await asgi.post("/v1/chat/completions", content=b"{")).status_code == 400
    assert (await asgi.post("/v1/chat/completions", json={"messages": []})).status_code == 400
    bad = await asgi.post("/v1/chat/completions", json=_body("fake:tokens=x"))
    assert bad.status_code == 400


async def test_streaming_echo_with_usage(server: tuple[httpx.AsyncClient, Path]) -> None:
    client, record = server
    body = _body("hello streaming world", stream=True, usage=True)
    async with client.stream("POST", "/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = await _sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert _content(chunks) == ["Echo:", " hello", " streaming", " world"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4

    lines = _records(record)
    assert [line["event"] for line in lines] == ["request", "closed"]
    assert lines[0]["path"] == "/v1/chat/completions"
    assert lines[0]["body"] == body
    assert lines[1] == {**lines[1], "request_index": 0, "completed": True}
    assert lines[0]["t"] <= lines[1]["t"]


async def test_streaming_tokens_reasoning_and_delay(server: tuple[httpx.AsyncClient, Path]) -> None:
    client, _ = server
    body = _body("fake:tokens=3 fake:reasoning=2 fake:delay_ms=20", stream=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.stream("POST", "/chat/completions", json=body) as response:
        payloads = await _sse_payloads(response)
    elapsed = loop.time() - started
    chunks = payloads[:-1]
    reasoning = [
        c["choices"][0]["delta"]["reasoning_content"]
        for c in chunks
        if "reasoning_content" in c["choices"][0]["delta"]
    ]
    assert reasoning == ["r0", " r1"]
    assert _content(chunks) == ["t0", " t1", " t2"]
    assert "usage" not in chunks[-1]  # not asked for
    assert elapsed >= 4 * 0.02  # four pauses between five deltas


async def test_fail_after_breaks_the_connection(server: tuple[httpx.AsyncClient, Path]) -> None:
    client, record = server
    seen: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        body = _body("fake:tokens=5 fake:fail_after=2", stream=True)
        async with client.stream("POST", "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seen.append(line)
    assert len(seen) == 3  # the role chunk and two deltas, no [DONE]
    assert _records(record)[-1] == {**_records(record)[-1], "event": "closed", "completed": False}


async def test_fail_after_non_streaming(server: tuple[httpx.AsyncClient, Path]) -> None:
    client, _ = server
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/chat/completions", json=_body("fake:fail_after=0"))


async def test_client_disconnect_is_recorded(server: tuple[httpx.AsyncClient, Path]) -> None:
    client, record = server
    body = _body("fake:tokens=50 fake:delay_ms=50", stream=True)
    async with client.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if '"t0"' in line:
                break
    for _ in range(100):
        if any(line["event"] == "closed" for line in _records(record)):
            break
        await asyncio.sleep(0.02)
    assert _records(record)[-1] == {**_records(record)[-1], "event": "closed", "completed": False}
