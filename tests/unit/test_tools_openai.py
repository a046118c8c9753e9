"""The openai runtime's tool loop against the in-process fake LLM (``fake:tool=``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from turnrelay.devtools.fake_llm import FakeLLM
from turnrelay.runtime.base import (
    RuntimeEvent,
    StepFinish,
    StepStart,
    TextDelta,
    ToolCall,
    ToolFailed,
    ToolInputDelta,
    ToolInputStart,
    ToolResult,
    TurnContext,
    Usage,
)
from turnrelay.runtime.openai import OpenAIRuntime
from turnrelay.settings import ModelRef
from turnrelay.tools import ToolContext, ToolRegistry
from turnrelay.tools.builtin import Calculate


class FailArgs(BaseModel):
    reason: str = "no reason"


class Fail:
    name = "fail"
    description = "Raises."
    args_model = FailArgs

    async def run(self, args: FailArgs, context: ToolContext) -> str:
        raise RuntimeError(args.reason)


class LoopArgs(BaseModel):
    pass


class Seen:
    """Records the context it ran with."""

    name = "seen"
    description = "Says who it ran for."
    args_model = LoopArgs

    async def run(self, args: LoopArgs, context: ToolContext) -> dict[str, Any]:
        return {"user": context.user_id, "session": context.session_id, "dir": str(context.workdir)}


@pytest.fixture
async def llm(tmp_path: Path) -> AsyncIterator[FakeLLM]:
    async with FakeLLM(record_path=str(tmp_path / "record.jsonl")) as server:
        yield server


@pytest.fixture
async def runtime(llm: FakeLLM, tmp_path: Path) -> AsyncIterator[OpenAIRuntime]:
    runtime = OpenAIRuntime(
        base_url=llm.base_url,
        max_retries=0,
        tools=ToolRegistry([Calculate(), Fail(), Seen()]),
        sandbox_dir=tmp_path / "sandbox",
        max_tool_steps=2,
    )
    yield runtime
    await runtime.shutdown()


def _ctx(text: str) -> TurnContext:
    return TurnContext(
        turn_id="t",
        session_id="s1",
        user_id="alice",
        attempt=1,
        model=ModelRef("openai", "fake"),
        system_prompt="be brief",
        user_text=text,
    )


def _requests(llm: FakeLLM) -> list[dict[str, Any]]:
    assert llm.record_path is not None
    lines = [json.loads(line) for line in Path(llm.record_path).read_text().splitlines()]
    return [line["body"] for line in lines if line["event"] == "request"]


async def _run(runtime: OpenAIRuntime, text: str) -> list[RuntimeEvent]:
    return [event async for event in runtime.run(_ctx(text))]


def _text(events: list[RuntimeEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_tool_call_result_and_answer(runtime: OpenAIRuntime, llm: FakeLLM) -> None:
    events = await _run(runtime, 'sum fake:tool=calculate:{"expression": "0.1 + 0.2"}')
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["StepStart", "ToolInputStart"]
    assert kinds.count("ToolInputDelta") >= 2  # the arguments streamed
    start = next(e for e in events if isinstance(e, ToolInputStart))
    assert start.tool_name == "calculate"
    streamed = "".join(e.delta for e in events if isinstance(e, ToolInputDelta))
    assert json.loads(streamed) == {"expression": "0.1 + 0.2"}
    call = next(e for e in events if isinstance(e, ToolCall))
    assert call.input == {"expression": "0.1 + 0.2"} and call.call_id == start.call_id
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.output == {"expression": "0.1 + 0.2", "result": "0.3"}
    # The result belongs to the step that called the tool; the answer is a new step.
    assert kinds.index("ToolResult") < kinds.index("StepFinish") < kinds.index("TextDelta")
    assert kinds.count("StepStart") == 2 and kinds.count("StepFinish") == 2
    assert isinstance(events[-1], Usage)
    assert _text(events) == 'Tool calculate returned: {"expression": "0.1 + 0.2", "result": "0.3"}'

    first, second = _requests(llm)
    offered = [t["function"]["name"] for t in first["tools"]]
    assert offered == ["calculate", "fail", "seen"]
    assert first["tools"][0]["function"]["parameters"]["required"] == ["expression"]
    assistant, tool = second["messages"][-2:]
    assert assistant["tool_calls"][0]["id"] == call.call_id
    assert tool == {
        "role": "tool",
        "tool_call_id": call.call_id,
        "content": '{"expression": "0.1 + 0.2", "result": "0.3"}',
    }


@pytest.mark.parametrize(
    ("directive", "error"),
    [
        (
            'fake:tool=fail:{"reason": "disk on fire"}',
            "Tool 'fail' failed: RuntimeError: disk on fire",
        ),
        ('fake:tool=calculate:{"expr": 1}', "Invalid arguments for tool 'calculate': expression:"),
        ("fake:tool=nonexistent", "Unknown tool 'nonexistent'"),
    ],
)
async def test_tool_errors_reach_the_model_and_the_turn_goes_on(
    runtime: OpenAIRuntime, llm: FakeLLM, directive: str, error: str
) -> None:
    events = await _run(runtime, f"try {directive}")
    failed = [e for e in events if isinstance(e, ToolFailed)]
    assert len(failed) == 1 and failed[0].error.startswith(error)
    assert any(isinstance(e, ToolCall) for e in events)  # the part exists before it fails
    assert _text(events).startswith("Tool ")  # the model answered after the error
    assert error in _text(events)
    assert _requests(llm)[-1]["messages"][-1]["content"].startswith(error)


async def test_tools_run_for_the_turns_user_in_its_session_directory(
    runtime: OpenAIRuntime, tmp_path: Path
) -> None:
    events = await _run(runtime, "who fake:tool=seen")
    (result,) = [e for e in events if isinstance(e, ToolResult)]
    sandbox = (tmp_path / "sandbox").resolve()
    assert result.output == {"user": "alice", "session": "s1", "dir": str(sandbox / "s1")}


async def test_the_tool_loop_is_bounded(llm: FakeLLM) -> None:
    runtime = OpenAIRuntime(
        base_url=llm.base_url, max_retries=0, tools=ToolRegistry([Calculate()]), max_tool_steps=0
    )
    try:
        events = await _run(runtime, 'x fake:tool=calculate:{"expression": "1"}')
    finally:
        await runtime.shutdown()
    # No step may run tools: the model is asked to answer at once, tools declared.
    (request,) = _requests(llm)
    assert request["tool_choice"] == "none"
    assert not any(isinstance(e, ToolInputStart | ToolResult | ToolFailed) for e in events)
    assert isinstance(events[0], StepStart) and isinstance(events[-2], StepFinish)
    assert _text(events) == "Echo: x"


async def test_no_tools_no_tool_fields(llm: FakeLLM) -> None:
    runtime = OpenAIRuntime(base_url=llm.base_url, max_retries=0, tools=ToolRegistry())
    try:
        events = await _run(runtime, "plain")
    finally:
        await runtime.shutdown()
    (request,) = _requests(llm)
    assert "tools" not in request and "tool_choice" not in request
    assert _text(events) == "Echo: plain"
