"""How the `claude` runtime turns the CLI's messages into runtime events."""

from __future__ import annotations

from typing import Any

# The `claude` extra (pip install -e '.[claude]') is part of the test install.
from claude_agent_sdk import AssistantMessage, StreamEvent, TextBlock

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
