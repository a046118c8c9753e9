"""Request bodies: turnrelay's own submit body and the AI SDK transport's.

Parsing is strict and every limit is explicit: the message size and the
``message_id`` form here; the body size while it is received (``api/body.py``).
Bad input raises a ``BadRequest``/``PayloadTooLarge`` with a message that says
what to fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from turnrelay.errors import BadRequest, PayloadTooLarge
from turnrelay.store.base import Multitask

MESSAGE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
SESSION_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True, slots=True)
class SubmitBody:
    message: str
    message_id: str | None
    model: str | None
    multitask: Multitask


def parse_json(raw: bytes) -> Any:
    """``raw`` is a body already read under its size limit (``read_body``)."""
    if not raw.strip():
        raise BadRequest("request body is empty; send JSON", code="invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc


def parse_submit(raw: bytes, *, max_message_bytes: int) -> SubmitBody:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    if "messages" in body and "message" not in body:
        message, message_id = _from_transport(body)
    else:
        raw_message, raw_id = body.get("message"), body.get("message_id")
        if not isinstance(raw_message, str):
            raise BadRequest("`message` must be a string", code="invalid_body")
        message, message_id = raw_message, raw_id
    if message_id is not None and (
        not isinstance(message_id, str) or not MESSAGE_ID.match(message_id)
    ):
        raise BadRequest(
            "`message_id` must be 1-128 characters of letters, digits, '_', '-', '.', ':'",
            code="invalid_message_id",
        )
    if not message.strip():
        raise BadRequest("the message is empty", code="empty_message")
    if len(message.encode()) > max_message_bytes:
        raise PayloadTooLarge(
            f"the message is over {max_message_bytes} bytes", code="message_too_large"
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("`model` must be a string", code="invalid_body")
    raw_mode = body.get("multitask", Multitask.ENQUEUE.value)
    try:
        multitask = Multitask(raw_mode)
    except ValueError as exc:
        raise BadRequest(
            "`multitask` must be one of enqueue, reject, interrupt", code="invalid_body"
        ) from exc
    return SubmitBody(message, message_id, model, multitask)


def _from_transport(body: dict[str, Any]) -> tuple[str, str | None]:
    """The AI SDK ``DefaultChatTransport`` body: ``{id, messages, trigger, messageId}``.

    The last user message's id is the idempotency key of a submit. A regenerate
    (``trigger: "regenerate-message"``) carries none: it always starts a new turn
    answering that text again (the earlier answer stays in the history)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list", code="invalid_body")
    last_user = next(
        (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None
    )
    if last_user is None:
        raise BadRequest("`messages` holds no user message", code="invalid_body")
    parts = last_user.get("parts")
    if isinstance(parts, list):
        text = "".join(
            p.get("text", "")
            for p in parts
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    elif isinstance(last_user.get("content"), str):
        text = last_user["content"]
    else:
        raise BadRequest("the last user message has no text parts", code="invalid_body")
    if body.get("trigger") == "regenerate-message":
        # ``Chat.regenerate()`` resends the user message it answers again, with
        # its id: a request for a new turn, not a repeat of the first submit.
        return text, None
    message_id = body.get("messageId") or last_user.get("id")
    return text, message_id if isinstance(message_id, str) else None


def check_session_id(session_id: str) -> bool:
    return bool(SESSION_ID.match(session_id))


# A cancel body is at most ``{"turn_id": "<uuid>"}``.
CANCEL_BODY_LIMIT = 1024


def parse_cancel(raw: bytes) -> str | None:
    """The ``turn_id`` of an optional ``{"turn_id": …}`` cancel body; ``None``
    for no body: cancel the session's head turn."""
    if not raw.strip():
        return None
    body = parse_json(raw)
    if not isinstance(body, dict) or set(body) - {"turn_id"}:
        raise BadRequest("the cancel body is `{turn_id?}`", code="invalid_body")
    turn_id = body.get("turn_id")
    if turn_id is None:
        return None
    if not isinstance(turn_id, str) or not check_session_id(turn_id):
        raise BadRequest("`turn_id` must be a turn id", code="invalid_body")
    return turn_id
