"""The terminal client's frame handling, without a server (the e2e suite has one)."""

from __future__ import annotations

import io
import json
from typing import Any

from turnrelay.chat_client import EXIT_FAILED, EXIT_OK, Console, _events, _Turn


def _turn() -> tuple[_Turn, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return _Turn(Console(out, err)), out, err


def _feed(turn: _Turn, *chunks: dict[str, Any]) -> None:
    for n, chunk in enumerate(chunks, start=turn.frames + 1):
        turn.feed(f"T:{n}", chunk)


def text(delta: str) -> dict[str, Any]:
    return {"type": "text-delta", "id": "x", "delta": delta}


def test_only_complete_events_count_and_comments_are_skipped() -> None:
    lines = ["id: T:1", "data: {}", "", ": ping", "", "id: T:2", "data: [DONE]", "", "id: T:3"]
    lines += ["data: {partial"]  # the connection broke here: never dispatched
    assert list(_events(iter(lines))) == [("T:1", "{}"), ("T:2", "[DONE]")]


def test_text_is_printed_and_the_cursor_kept() -> None:
    turn, out, err = _turn()
    _feed(turn, {"type": "start"}, text("Hello"), text(" world"), {"type": "finish"})
    assert out.getvalue() == "Hello world"
    assert turn.cursor == "T:4" and turn.turn_id == "T"
    assert turn.outcome == EXIT_OK and err.getvalue() == ""


def test_reasoning_and_tools_go_to_stderr_as_notes() -> None:
    turn, out, err = _turn()
    _feed(
        turn,
        {"type": "reasoning-delta", "id": "r", "delta": "thinking"},
        {"type": "tool-input-available", "toolCallId": "c", "toolName": "clock", "input": {}},
        {"type": "tool-output-available", "toolCallId": "c", "output": "12:00"},
        text("It is noon."),
    )
    assert out.getvalue() == "It is noon."
    assert err.getvalue() == "thinking\n[tool clock {}]\n[tool result 12:00]\n"


def test_a_stream_reset_snapshot_is_not_printed_twice() -> None:
    turn, out, err = _turn()
    _feed(turn, text("t0 t1"), text(" t2"))
    _feed(
        turn,
        {"type": "data-stream-reset", "data": {"seq": 3}, "transient": True},
        {"type": "reasoning-delta", "id": "r", "delta": "old thoughts"},
        text("t0 t1 t2"),  # the snapshot
        text(" t3"),  # live again
    )
    assert out.getvalue() == "t0 t1 t2 t3"
    assert err.getvalue() == ""


def test_failed_and_aborted_turns() -> None:
    turn, _, _ = _turn()
    _feed(turn, {"type": "error", "errorText": "boom"}, {"type": "finish"})
    assert turn.outcome == EXIT_FAILED and turn.error == "boom"
    turn, _, _ = _turn()
    _feed(turn, {"type": "abort"}, {"type": "finish"})
    assert turn.outcome == EXIT_FAILED and turn.aborted


def test_a_410_while_the_turn_still_runs_is_not_taken_for_its_end() -> None:
    """The stored message of a running turn is a checkpoint, not the answer:
    the client tries the stream again instead of printing it as final."""
    import httpx

    from turnrelay.chat_client import ChatClient

    def sse(*frames: tuple[int, dict[str, Any]], done: bool = False) -> bytes:
        body = "".join(f"id: T:{n}\ndata: {json.dumps(c)}\n\n" for n, c in frames)
        return (body + ("data: [DONE]\n\n" if done else "")).encode()

    status = {"value": "running"}
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path} {request.headers.get('last-event-id')}")
        headers = {"x-turn-id": "T", "content-type": "text/event-stream"}
        if request.method == "POST":
            start = {"type": "start", "messageId": "m"}
            return httpx.Response(200, headers=headers, content=sse((1, start), (2, text("Hel"))))
        if request.url.path.endswith("/stream"):
            if status["value"] == "running":
                status["value"] = "seen"  # the next history read still says running
                return httpx.Response(410, json={"detail": "gone", "code": "gone"})
            finish = {"type": "finish"}
            return httpx.Response(
                200, headers=headers, content=sse((3, text("lo")), (4, finish), done=True)
            )
        message = {"turn_id": "T", "role": "assistant", "content": "Hel", "status": "running"}
        return httpx.Response(200, json={"messages": [message]})

    out, err = io.StringIO(), io.StringIO()
    client = ChatClient("http://test", console=Console(out, err), backoff=0)
    client.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    try:
        assert client.send("S", "hi") == EXIT_OK
    finally:
        client.close()
    assert out.getvalue().strip() == "Hello"
    assert calls[-1] == "GET /api/chat/sessions/S/stream T:2"
