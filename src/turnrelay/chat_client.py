"""``turnrelay chat``: a terminal client for a running turnrelay server.

It speaks the same HTTP API as a browser: creates a session (or joins ``--session``),
submits each message to ``POST /sessions/{id}/stream`` and prints the reply's text as
its frames arrive. Standard output carries only the replies, so a one-shot answer can
be piped; the session id, reasoning (dimmed on a terminal), one-line tool notes,
reconnection notes and errors go to standard error.

A dropped connection does not lose or repeat text: every frame's ``id:`` is kept as
the cursor, and the client reconnects with ``GET /sessions/{id}/stream`` and
``Last-Event-ID``, so the server replays exactly the frames after it. Until the first
frame has arrived there is no cursor: the client then reads the turn by its id (the
``x-turn-id`` header), or submits again with the same ``message_id``, which the server
answers with the same turn. Reconnects back off exponentially and give up after
``retries`` attempts in a row.

Ctrl-C during a reply asks the server to cancel the turn (the turn runs on the server
and would otherwise finish without a reader) and prints a "stopped" note; in the
interactive loop it returns to the prompt, and Ctrl-C at the prompt exits.

Exit codes: 0 the turn completed (or the loop ended), 1 the turn failed or was
cancelled elsewhere, 2 a usage, HTTP or connection error, 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

DEFAULT_URL = "http://127.0.0.1:8000"
# Three server heartbeats (10 s by default): a silent connection is a dead one.
READ_TIMEOUT = 30.0
# Status codes that mean "this API process cannot answer now": reconnect and retry.
_RETRYABLE_STATUS = {502, 503, 504}

_DIM = "\x1b[2m"
_RESET = "\x1b[0m"


class ChatError(Exception):
    """A one-line reason to stop: the server refused, or could not be reached."""


class _Dropped(Exception):
    """The stream ended before the turn's ``[DONE]``."""


@dataclass
class Console:
    """Where replies (``out``) and everything else (``err``) are written."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    _line_open: bool = False
    _reasoning_open: bool = False

    def __post_init__(self) -> None:
        self.styled = self.err.isatty()
        # Replies and notes share one screen only when both go to a terminal.
        self.shared = self.styled and self.out.isatty()

    def text(self, delta: str) -> None:
        self._end_reasoning()
        self.out.write(delta)
        self.out.flush()
        self._line_open = not delta.endswith("\n")

    def reasoning(self, delta: str) -> None:
        self._break_line()
        self.err.write(f"{_DIM}{delta}{_RESET}" if self.styled else delta)
        self.err.flush()
        self._reasoning_open = True

    def note(self, message: str) -> None:
        """One line of commentary, on a line of its own."""
        self._end_reasoning()
        self._break_line()
        self.err.write(f"{_DIM}[{message}]{_RESET}\n" if self.styled else f"[{message}]\n")
        self.err.flush()

    def error(self, message: str) -> None:
        self._end_reasoning()
        self._break_line()
        self.err.write(f"turnrelay chat: {message}\n")
        self.err.flush()

    def end_reply(self) -> None:
        self._end_reasoning()
        if self._line_open:
            self.out.write("\n")
            self.out.flush()
            self._line_open = False

    def _end_reasoning(self) -> None:
        if self._reasoning_open:
            self.err.write("\n")
            self.err.flush()
            self._reasoning_open = False

    def _break_line(self) -> None:
        if self._line_open and self.shared:
            self.out.write("\n")
            self.out.flush()
            self._line_open = False


@dataclass
class _Turn:
    """What the client knows of one turn while it streams."""

    console: Console
    turn_id: str | None = None
    cursor: str | None = None
    text: str = ""
    frames: int = 0
    error: str | None = None
    aborted: bool = False
    # After a ``data-stream-reset`` the server sends a snapshot of the message so far:
    # the text already printed, which is not printed again.
    replaying: str | None = None

    def feed(self, ident: str | None, chunk: dict[str, Any]) -> None:
        self.frames += 1
        if ident:
            self.cursor = ident
            self.turn_id = ident.rpartition(":")[0] or self.turn_id
        kind = chunk.get("type")
        if kind == "text-delta":
            self._text(chunk["delta"])
        elif kind == "data-stream-reset":
            self.replaying, self.text = self.text, ""
        elif kind == "data-turn-retry":
            # The new attempt writes its answer from the start.
            attempt = (chunk.get("data") or {}).get("attempt")
            self.console.note(f"the server restarted the turn (attempt {attempt})")
            self.text, self.replaying = "", None
        elif kind == "error":
            self.error = str(chunk.get("errorText") or "the turn failed")
        elif kind == "abort":
            self.aborted = True
        elif self.replaying is not None:
            return  # reasoning and tool notes of the snapshot were shown already
        elif kind == "reasoning-delta":
            self.console.reasoning(chunk["delta"])
        elif kind == "tool-input-available":
            args = json.dumps(chunk.get("input"), ensure_ascii=False)
            self.console.note(f"tool {chunk.get('toolName')} {_clip(args)}")
        elif kind == "tool-output-available":
            output = chunk.get("output")
            shown = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
            self.console.note(f"tool result {_clip(shown)}")
        elif kind == "tool-output-error":
            self.console.note(f"tool failed: {_clip(str(chunk.get('errorText')))}")

    def _text(self, delta: str) -> None:
        text = self.text + delta
        shown = self.replaying
        if shown is not None:
            if shown.startswith(text):
                self.text = text
                return
            self.replaying = None
            if text.startswith(shown):
                delta = text[len(shown) :]
            else:
                self.console.note("the reply was rebuilt by the server")
                delta = text
        self.text = text
        if delta:
            self.console.text(delta)

    @property
    def outcome(self) -> int:
        if self.error is not None:
            return EXIT_FAILED
        return EXIT_FAILED if self.aborted else EXIT_OK


class ChatClient:
    """One server, one bearer token; methods raise ``ChatError`` with a one-line reason."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        console: Console | None = None,
        retries: int = 6,
        backoff: float = 0.25,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self.console = console or Console()
        self.retries = retries
        self.backoff = backoff
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(10.0, read=read_timeout),
        )

    def close(self) -> None:
        self.http.close()

    def create_session(self) -> str:
        try:
            r = self.http.post("/api/chat/sessions")
        except httpx.HTTPError as exc:
            raise ChatError(self._unreachable(exc)) from exc
        _raise_for_status(r)
        return str(r.json()["id"])

    def cancel(self, session_id: str) -> None:
        """Ask the server to stop the session's turn; says how it went."""
        try:
            r = self.http.post(f"/api/chat/sessions/{session_id}/cancel")
            _raise_for_status(r)
            body = r.json()
        except (httpx.HTTPError, ChatError, ValueError) as exc:
            self.console.note(f"could not stop the turn: {exc}")
            return
        if body.get("cancelled"):
            self.console.note("stopped")
        elif body.get("reason") == "timeout":
            self.console.note("stop requested; the server is still stopping the turn")
        else:
            self.console.note("stopped (the turn had already ended)")

    def send(self, session_id: str, message: str, *, model: str | None = None) -> int:
        """Submit ``message`` and print the reply as it streams; the exit code."""
        body: dict[str, Any] = {"message": message, "message_id": str(uuid.uuid4())}
        if model:
            body["model"] = model
        turn = _Turn(self.console)
        failures = 0
        while True:
            frames_before = turn.frames
            try:
                if self._stream(session_id, body, turn):
                    break
                problem = "the stream ended before the turn did"
            except httpx.TransportError as exc:
                if isinstance(exc, httpx.ConnectError) and turn.turn_id is None and not failures:
                    raise ChatError(self._unreachable(exc)) from exc
                problem = _describe(exc)
            except _Dropped as exc:
                problem = str(exc)
            if turn.frames > frames_before:
                failures = 0  # this connection made progress: back off from the start
            failures += 1
            if failures > self.retries:
                raise ChatError(f"lost the connection to {self.url}: {problem}")
            if failures == 1:
                self.console.note(f"connection lost ({problem}); reconnecting")
            time.sleep(min(self.backoff * 2 ** (failures - 1), 5.0))
        self.console.end_reply()
        if turn.error is not None:
            self.console.error(f"the turn failed: {turn.error}")
        elif turn.aborted:
            self.console.note("the turn was stopped")
        return turn.outcome

    def _stream(self, session_id: str, body: dict[str, Any], turn: _Turn) -> bool:
        """One connection's worth of the turn; True once ``[DONE]`` arrived."""
        path = f"/api/chat/sessions/{session_id}/stream"
        if turn.cursor:
            request = self.http.stream("GET", path, headers={"last-event-id": turn.cursor})
        elif turn.turn_id:
            request = self.http.stream("GET", path, params={"turn_id": turn.turn_id})
        else:
            request = self.http.stream("POST", path, json=body)
        with request as r:
            if r.status_code == 410 and turn.turn_id:
                r.read()
                if self._finish_from_history(session_id, turn):
                    return True
                raise _Dropped("the stream is gone while the turn still runs")
            if r.status_code in _RETRYABLE_STATUS and turn.turn_id:
                r.read()
                raise _Dropped(f"HTTP {r.status_code}")
            _raise_for_status(r)
            turn.turn_id = r.headers.get("x-turn-id") or turn.turn_id
            for ident, data in _events(r.iter_lines()):
                if data == "[DONE]":
                    return True
                turn.feed(ident, json.loads(data))
        return False

    def _finish_from_history(self, session_id: str, turn: _Turn) -> bool:
        """The stream expired while we were away: print the rest from the stored
        message. False while the turn still runs (what is stored is only a
        checkpoint, not the answer): the caller tries the stream again."""
        r = self.http.get(f"/api/chat/sessions/{session_id}")
        _raise_for_status(r)
        for message in r.json().get("messages", []):
            if message.get("turn_id") == turn.turn_id and message.get("role") == "assistant":
                if message.get("status") in ("queued", "running"):
                    return False
                content = str(message.get("content") or "")
                if content.startswith(turn.text):
                    turn.console.text(content[len(turn.text) :])
                else:
                    turn.console.note("the stream expired; the stored reply follows")
                    turn.console.text(content)
                turn.text = content
                status = message.get("status")
                if status == "failed":
                    turn.error = "the turn failed"
                elif status == "cancelled":
                    turn.aborted = True
                return True
        raise ChatError(f"the stream of turn {turn.turn_id} expired and its reply is not stored")

    def _unreachable(self, exc: Exception) -> str:
        return f"cannot reach {self.url} ({_describe(exc)}): is `turnrelay serve` running?"


def _events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(id, data) per complete server-sent event; comments and partial events skipped."""
    ident: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield ident, "\n".join(data)
            ident, data = None, []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            ident = value
        elif name == "data":
            data.append(value)


def _raise_for_status(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    r.read()
    try:
        body = r.json()
        detail, code = body.get("detail"), body.get("code")
    except (ValueError, AttributeError):
        detail, code = r.text.strip().splitlines()[0] if r.text.strip() else "", None
    message = f"{detail or r.reason_phrase} (HTTP {r.status_code}{', ' + code if code else ''})"
    if r.status_code == 401:
        message += ": pass --token or set TURNRELAY_TOKEN"
    raise ChatError(message)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clip(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_line(console: Console) -> str | None:
    """The next message from the user; None at end of input."""
    if sys.stdin.isatty():
        try:
            return input("> ")
        except EOFError:
            console.err.write("\n")
            return None
    line = sys.stdin.readline()
    return line if line else None


def run(
    url: str,
    token: str | None,
    session_id: str | None,
    message: str | None,
    *,
    model: str | None = None,
    console: Console | None = None,
) -> int:
    """The ``turnrelay chat`` command; returns the exit code."""
    console = console or Console()
    client = ChatClient(url, token, console=console)
    try:
        if session_id is None:
            session_id = client.create_session()
            console.note(f"session {session_id}")
        if message is not None:
            return _one_turn(client, session_id, message, model)
        return _loop(client, session_id, model)
    except KeyboardInterrupt:  # a second Ctrl-C while a turn was being stopped
        return EXIT_INTERRUPTED
    except ChatError as exc:
        console.end_reply()
        console.error(str(exc))
        return EXIT_ERROR
    finally:
        client.close()


def _one_turn(client: ChatClient, session_id: str, message: str, model: str | None) -> int:
    """One turn; on Ctrl-C the turn is cancelled and 130 returned. A second Ctrl-C
    while cancelling propagates."""
    try:
        return client.send(session_id, message, model=model)
    except KeyboardInterrupt:
        client.console.end_reply()
        client.cancel(session_id)
        return EXIT_INTERRUPTED


def _loop(client: ChatClient, session_id: str, model: str | None) -> int:
    console = client.console
    if sys.stdin.isatty():
        console.note("type a message; Ctrl-C stops a reply, Ctrl-D or Ctrl-C at the prompt exits")
    while True:
        try:
            line = _read_line(console)
        except KeyboardInterrupt:
            console.err.write("\n")
            return EXIT_INTERRUPTED
        if line is None:
            return EXIT_OK
        text = line.strip()
        if not text:
            continue
        try:
            _one_turn(client, session_id, text, model)
        except ChatError as exc:
            console.end_reply()
            console.error(str(exc))
