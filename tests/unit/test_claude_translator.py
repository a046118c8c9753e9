"""How the `claude` runtime turns the CLI's messages into runtime events."""

from __future__ import annotations

from typing import Any

# The `claude` extra (pip install -e '.[claude]') is part of the test install.
from claude_agent_sdk import (
    AssistantMessage,
    StreamEvent,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from turnrelay.runtime.base import TextDelta
from turnrelay.runtime.claude import _Translator


def _event(event: dict[str, Any]) -> StreamEvent:
    return StreamEvent(uuid="u", session_id="s", event=event)


def _streamed(message_id: str, *pieces: str) -> list[StreamEvent]:
    return [
        _event({"type": "message_start", "message": {"id": message_id}}),
        *(
            _event({"type": "content_block_delta", "delta": {"type": "text_delta", "text": p}})
            for p in pieces
        ),
    ]


def _text(translator: _Translator, messages: list[Any]) -> str:
    return "".join(e.text for m in messages for e in translator.feed(m) if isinstance(e, TextDelta))


def _final(message_id: str, text: str) -> AssistantMessage:
    return AssistantMessage(content=[TextBlock(text)], model="m", message_id=message_id)


def test_a_streamed_step_is_not_repeated_by_its_final_message() -> None:
    t = _Translator(max_turns=5)
    assert _text(t, [*_streamed("msg_a", "t0", " t1"), _final("msg_a", "t0 t1")]) == "t0 t1"


def test_a_step_fetched_again_without_streaming_is_not_shown_twice() -> None:
    # The CLI gives up on a stalled stream and fetches the step again without
    # streaming: the final message has another id but repeats what was shown.
    t = _Translator(max_turns=5)
    assert _text(t, [*_streamed("msg_a", "t0", " t1"), _final("msg_b", "t0 t1")]) == "t0 t1"


def test_a_refetched_step_adds_only_the_text_beyond_the_stream() -> None:
    t = _Translator(max_turns=5)
    got = _text(t, [*_streamed("msg_a", "t0"), _final("msg_b", "t0 t1 t2")])
    assert got == "t0 t1 t2"


def test_an_unstreamed_message_is_shown_whole() -> None:
    t = _Translator(max_turns=5)
    assert _text(t, [_final("msg_a", "hello")]) == "hello"
    # and a later streamed step is not confused with it
    assert _text(t, [*_streamed("msg_b", "x"), _final("msg_b", "x")]) == "x"


def _calls(message_id: str, *calls: tuple[str, str, dict[str, Any]]) -> list[Any]:
    return [
        _event({"type": "message_start", "message": {"id": message_id}}),
        AssistantMessage(
            content=[ToolUseBlock(id=i, name=n, input=a) for i, n, a in calls],
            model="m",
            message_id=message_id,
        ),
    ]


def _results(*ids: str, error: bool = False) -> UserMessage:
    return UserMessage(
        content=[ToolResultBlock(tool_use_id=i, content="stopped", is_error=error) for i in ids]
    )


def _asks(name: str, arguments: Any) -> bool:
    return name == "save_note"


def test_a_hold_keeps_the_steps_unanswered_calls_and_hides_their_stopped_results() -> None:
    t = _Translator(max_turns=5, needs_approval=_asks)
    for m in _calls(
        "msg_a",
        ("c1", "mcp__turnrelay__current_time", {}),
        ("c2", "mcp__turnrelay__save_note", {"text": "x"}),
        ("c3", "mcp__turnrelay__calculate", {"expression": "1+1"}),
    ):
        t.feed(m)
    assert t.tools_started() and t.step_asks()
    t.feed(_results("c1"))  # ran before the held call
    held = t.hold()
    assert [(h.id, h.name, h.approval_id is not None) for h in held] == [
        ("c2", "save_note", True),
        ("c3", "calculate", False),  # kept from running: runs in the continuation
    ]
    assert held[0].input == {"text": "x"}
    # The CLI's "stopped" results of the held calls never reach the chat.
    assert t.feed(_results("c2", "c3", error=True)) == []


def test_steering_is_offered_once_per_step_with_calls_and_not_where_one_asks() -> None:
    t = _Translator(max_turns=5, needs_approval=_asks)
    assert not t.tools_started()  # no step yet
    for m in _calls("msg_a", ("c1", "mcp__turnrelay__current_time", {})):
        t.feed(m)
    assert t.requests == 1 and t.tools_started() and not t.step_asks()
    assert not t.tools_started()  # once per step
    assert t.step_call_ids() == ["c1"]
    for m in _calls("msg_b", ("c2", "mcp__turnrelay__save_note", {"text": "y"})):
        t.feed(m)
    assert t.requests == 2 and t.tools_started() and t.step_asks()
    t.feed(_streamed("msg_c", "done")[0])
    assert not t.tools_started()  # a step that only answers
