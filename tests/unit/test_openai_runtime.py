"""OpenAIRuntime through the real ``openai`` SDK against a real fake-llm process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from turnrelay.errors import ModelError
from turnrelay.runtime.base import (
    ReasoningDelta,
    RuntimeEvent,
    StepFinish,
    StepStart,
    TextDelta,
    TurnContext,
    Usage,
)
from turnrelay.runtime.openai import OpenAIRuntime, bound_history, build_messages
from turnrelay.settings import ModelRef
from turnrelay.store.base import MessageRecord, TurnStatus


@dataclass
class FakeServer:
    base_url: str
    record: Path

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def request_with(self, marker: str) -> dict[str, Any]:
        (line,) = [
            line
            for line in self.lines()
            if line["event"] == "request" and marker in json.dumps(line["body"])
        ]
        return line

    async def wait_closed(self, index: int) -> dict[str, Any]:
        for _ in range(200):
            for line in self.lines():
                if line["event"] == "closed" and line["request_index"] == index:
                    return line
            await asyncio.sleep(0.02)
        raise AssertionError(f"request {index} was never closed")


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServer]:
    record = tmp_path_factory.mktemp("fake-llm") / "record.jsonl"
    command = [sys.executable, "-m", "turnrelay.devtools.fake_llm", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--record", str(record)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("fake-llm listening on http://"), line
        yield FakeServer(base_url=line.split()[-1] + "/v1", record=record)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
async def runtime(fake_server: FakeServer) -> AsyncIterator[OpenAIRuntime]:
    runtime = OpenAIRuntime(base_url=fake_server.base_url, api_key=None, max_retries=0)
    await runtime.startup()
    yield runtime
    await runtime.shutdown()


def _record(turn: str, role: str, content: str) -> MessageRecord:
    return MessageRecord(
        id=str(uuid.uuid4()),
        session_id="s",
        turn_id=turn,
        role=role,
        content=content,
        parts=[],
        status=TurnStatus.COMPLETED,
        created_at=datetime.now(UTC),
    )


def _ctx(text: str, history: list[MessageRecord] | None = None, tokens: int = 32000) -> TurnContext:
    return TurnContext(
        turn_id="t",
        session_id="s",
        user_id="u",
        attempt=1,
        model=ModelRef("openai", "fake-model"),
        system_prompt="be brief",
        user_text=text,
        history=history or [],
        history_tokens=tokens,
    )


async def _collect(runtime: OpenAIRuntime, ctx: TurnContext) -> list[RuntimeEvent]:
    return [event async for event in runtime.run(ctx)]


def _text(events: list[RuntimeEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_text_turn_streams_several_deltas(
    runtime: OpenAIRuntime, fake_server: FakeServer
) -> None:
    marker = uuid.uuid4().hex
    events = await _collect(runtime, _ctx(f"hello there {marker}"))
    assert isinstance(events[0], StepStart)
    assert isinstance(events[-2], StepFinish)
    assert isinstance(events[-1], Usage) and events[-1].output_tokens == 4
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == 4
    assert _text(events) == f"Echo: hello there {marker}"

    request = fake_server.request_with(marker)
    assert request["body"]["model"] == "fake-model"
    assert request["body"]["stream"] is True
    assert request["body"]["stream_options"] == {"include_usage": True}
    closed = await fake_server.wait_closed(request["request_index"])
    assert closed["completed"] is True


async def test_reasoning_deltas(runtime: OpenAIRuntime) -> None:
    events = await _collect(runtime, _ctx("think fake:reasoning=3 fake:tokens=2"))
    reasoning = [e.text for e in events if isinstance(e, ReasoningDelta)]
    assert reasoning == ["r0", " r1", " r2"]
    assert _text(events) == "t0 t1"


async def test_history_is_sent_and_bounded(runtime: OpenAIRuntime, fake_server: FakeServer) -> None:
    old = "x" * 4000  # ~1000 tokens: the oldest turn does not fit in the bound
    history = [
        _record("1", "user", old),
        _record("1", "assistant", "first answer"),
        _record("2", "user", "second question"),
        _record("2", "assistant", "second answer"),
        _record("3", "user", "third question"),
        _record("3", "assistant", ""),  # a failed turn without text
    ]
    marker = uuid.uuid4().hex
    await _collect(runtime, _ctx(f"now {marker}", history, tokens=500))
    sent = fake_server.request_with(marker)["body"]["messages"]
    assert sent == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "third question"},
        {"role": "user", "content": f"now {marker}"},
    ]


def test_bound_history_drops_oldest_whole_turns() -> None:
    history = [_record(str(i // 2), ("user", "assistant")[i % 2], "y" * 40) for i in range(8)]
    # Each message costs 10 + 4 tokens: a turn 28.
    assert bound_history(history, 1000) == history
    assert bound_history(history, 60) == history[4:]
    assert bound_history(history, 27) == []
    assert build_messages(_ctx("q", history, 56))[1:] == [
        {"role": r.role, "content": r.content} for r in history[4:]
    ] + [{"role": "user", "content": "q"}]


async def test_http_error_is_a_model_error(runtime: OpenAIRuntime) -> None:
    events: list[RuntimeEvent] = []
    with pytest.raises(ModelError, match="HTTP 500") as caught:
        async for event in runtime.run(_ctx("fake:error=500")):
            events.append(event)
    assert events == []
    assert "Traceback" not in caught.value.detail


async def test_broken_stream_is_a_model_error_after_the_first_deltas(
    runtime: OpenAIRuntime,
) -> None:
    events: list[RuntimeEvent] = []
    with pytest.raises(ModelError, match="broke off after") as caught:
        async for event in runtime.run(_ctx("fake:tokens=10 fake:fail_after=3")):
            events.append(event)
    assert _text(events) == "t0 t1 t2"
    assert not any(isinstance(e, StepFinish) for e in events)
    assert "\n" not in caught.value.detail


async def test_unreachable_endpoint_is_a_model_error() -> None:
    runtime = OpenAIRuntime(base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=5)
    try:
        with pytest.raises(ModelError, match="could not reach the model endpoint"):
            await _collect(runtime, _ctx("hello"))
    finally:
        await runtime.shutdown()


async def test_cancellation_closes_the_model_stream(
    runtime: OpenAIRuntime, fake_server: FakeServer
) -> None:
    marker = uuid.uuid4().hex
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for event in runtime.run(_ctx(f"{marker} fake:tokens=200 fake:delay_ms=50")):
            if isinstance(event, TextDelta):
                first_delta.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_delta.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    request = fake_server.request_with(marker)
    closed = await fake_server.wait_closed(request["request_index"])
    assert closed["completed"] is False


async def test_the_aiohttp_transport_is_used_unless_a_proxy_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from openai._vendor.httpx_aiohttp import AiohttpTransport

    from turnrelay.runtime.openai import _aiohttp_client

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = _aiohttp_client()
    assert client is not None and isinstance(client._transport, AiohttpTransport)
    await client.aclose()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert _aiohttp_client() is None  # the SDK's own client, which honours the proxy
