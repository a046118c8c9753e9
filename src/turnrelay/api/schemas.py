"""The HTTP contract as pydantic models: request bodies, answers, errors.

The same models validate what arrives, shape what leaves and generate the
OpenAPI document (``turnrelay.api.openapi``), so the document cannot drift from
the code. Validation is strict and every limit is explicit: the message form
and the ``message_id`` form here; the message size (a setting) in
``parse_submit``; the body size while it is received (``api/body.py``). Bad
input raises a ``BadRequest``/``PayloadTooLarge`` whose message says what to fix.

A rule JSON Schema can express is stated in the schema itself (``pattern``,
``contains``, ``not``), and where pydantic cannot check it on its own, the
model's validator checks the same rule with the same constant: the
document and the validation say the same thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
)

from turnrelay.errors import BadRequest, PayloadTooLarge, TurnrelayError, Unprocessable
from turnrelay.store.base import Decision, Multitask, TurnStatus
from turnrelay.webhooks import MAX_URL_CHARS

MESSAGE_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# White space as ``str.isspace`` has it, spelled out: ``\s`` means less in the
# ECMA-262 regexes of JSON Schema (not U+001C-U+001F), so a document saying
# ``\S`` would call a message of U+001C alone valid where Python finds it blank.
WHITE_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# "Has a character that is not white space".
NONBLANK_PATTERN = f"[^{WHITE_SPACE}]"
MESSAGE_ID = re.compile(MESSAGE_ID_PATTERN)
SESSION_ID = re.compile(UUID_PATTERN)
NONBLANK = re.compile(NONBLANK_PATTERN)
WEBHOOK_URL_PATTERN = (
    rf"^[hH][tT][tT][pP][sS]?://[^/?#@{WHITE_SPACE}\x00]+([/?#][^{WHITE_SPACE}\x00]*)?$"
)
# Text that is stored must hold no NUL: PostgreSQL's text cannot, and the INSERT would fail.
NUL_PATTERN = r"\x00"
NO_NUL: dict[str, Any] = {"not": {"pattern": NUL_PATTERN}}

Timestamp = Annotated[
    datetime,
    PlainSerializer(lambda v: v.isoformat(), return_type=str, when_used="json"),
    Field(json_schema_extra={"format": "date-time"}),
]


class _Body(BaseModel):
    """A request body: unknown keys are ignored (clients add their own)."""

    model_config = ConfigDict(extra="ignore", strict=True, regex_engine="python-re")


class _Answer(BaseModel):
    """An answer: exactly these keys."""

    model_config = ConfigDict(extra="forbid")


# -- requests ------------------------------------------------------------------------


class _SubmitOptions(_Body):
    model: str | None = Field(None, description="`provider:model`; one of the allowed models.")
    multitask: Literal["enqueue", "reject", "interrupt", "steer"] = Field(
        "enqueue",
        description="When the session already has an active turn: queue behind it, "
        "refuse (409 with its `turn_id`), cancel it and run this one, or `steer`: "
        "deliver it into the running turn before its next model request (if the "
        "turn ends first, it is the next turn).",
    )
    webhook_url: str | None = Field(
        None,
        max_length=MAX_URL_CHARS,
        pattern=WEBHOOK_URL_PATTERN,
        description="Announce the turn's end here (signed, Standard Webhooks). Private and "
        "loopback targets are refused (422) unless the server allows them.",
    )


class SubmitRequest(_SubmitOptions):
    """turnrelay's own submit body."""

    message: str = Field(
        pattern=NONBLANK_PATTERN,
        json_schema_extra=NO_NUL,
        description="The user's message: at least one character that is not white space, "
        "no NUL, at most `TURNRELAY_MAX_MESSAGE_BYTES` bytes of UTF-8 (413 beyond).",
    )
    message_id: str | None = Field(
        None,
        pattern=MESSAGE_ID_PATTERN,
        description="A client-made id, unique per session: the same id again answers with "
        "the same turn; the same id with another message is 409.",
    )

    @field_validator("message")
    @classmethod
    def _no_nul(cls, message: str) -> str:
        return _without_nul(message)


def _without_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("the text holds a NUL character (\\u0000)")
    return text


TEXT_PART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {
        "type": {"const": "text"},
        "text": {"type": "string", "pattern": NONBLANK_PATTERN},
    },
}


NUL_TEXT_PART: dict[str, Any] = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string", "pattern": NUL_PATTERN}},
}


def _is_text_part(part: Any) -> bool:
    """Python's reading of ``TEXT_PART_SCHEMA``."""
    return (
        isinstance(part, dict)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
        and bool(NONBLANK.search(part["text"]))
    )


class UserUIMessage(_Body):
    """A user message of the AI SDK's ``UIMessage`` form."""

    id: str = Field(pattern=MESSAGE_ID_PATTERN)
    role: Literal["user"]
    parts: list[dict[str, Any]] = Field(
        json_schema_extra={"contains": TEXT_PART_SCHEMA, "not": {"contains": NUL_TEXT_PART}},
        description="At least one text part with text, and none with a NUL; the text "
        "parts joined are the message.",
    )

    @field_validator("parts")
    @classmethod
    def _has_text(cls, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not any(_is_text_part(p) for p in parts):
            raise ValueError("a user message needs a text part with text")
        for p in parts:  # Python's reading of NUL_TEXT_PART
            if p.get("type") == "text" and isinstance(p.get("text"), str):
                _without_nul(p["text"])
        return parts

    @property
    def text(self) -> str:
        return "".join(
            p["text"]
            for p in self.parts
            if p.get("type") == "text" and isinstance(p.get("text"), str)
        )


class OtherUIMessage(_Body):
    """An assistant or system message of the history (the server keeps its own)."""

    id: str
    role: Literal["assistant", "system"]
    parts: list[dict[str, Any]]


UIMessage = Annotated[UserUIMessage | OtherUIMessage, Field(discriminator="role")]


class TransportRequest(_SubmitOptions):
    """The body the AI SDK's ``DefaultChatTransport`` sends. The last user
    message's text is the message and ``messageId`` (else that message's id) its
    ``message_id``; ``trigger: regenerate-message`` asks for a new answer to it,
    never a repeat of the first turn."""

    model_config = ConfigDict(
        json_schema_extra={"not": {"required": ["message"]}},
    )

    id: str | None = Field(None, description="The chat's id (the session is in the path).")
    messages: list[UIMessage] = Field(
        min_length=1,
        json_schema_extra={"contains": {"properties": {"role": {"const": "user"}}}},
        description="The chat's messages; at least one from the user.",
    )
    trigger: Literal["submit-message", "regenerate-message"] | None = None
    messageId: str | None = Field(None, pattern=MESSAGE_ID_PATTERN)

    @field_validator("messages")
    @classmethod
    def _has_user(cls, messages: list[Any]) -> list[Any]:
        if not any(isinstance(m, UserUIMessage) for m in messages):
            raise ValueError("`messages` holds no user message")
        return messages


APPROVAL_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_DECISIONS = 100
REASON_MAX = 500


class ApprovalDecision(_Body):
    approval_id: str = Field(pattern=APPROVAL_ID_PATTERN)
    approved: bool
    reason: str | None = Field(
        None, max_length=REASON_MAX, description="Why (the model reads it on a denial)."
    )

    @field_validator("reason")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        return None if value is None else _without_nul(value)


class ApprovalsRequest(_Body):
    """The user's answers to a waiting turn's tool approval requests."""

    model_config = ConfigDict(extra="forbid")

    decisions: list[ApprovalDecision] = Field(min_length=1, max_length=MAX_DECISIONS)


class CancelRequest(_Body):
    """``{turn_id?}``; no body at all cancels the session's head turn."""

    model_config = ConfigDict(extra="forbid")

    turn_id: str | None = Field(None, pattern=UUID_PATTERN)


# -- answers -------------------------------------------------------------------------


class ErrorAnswer(_Answer):
    detail: str = Field(description="What went wrong and what to fix; never a stack trace.")
    code: str = Field(description="A stable machine code, e.g. `session_not_found`.")
    turn_id: str | None = Field(None, description="With `turn_active`: the active turn.")


class SessionCreated(_Answer):
    id: str
    created_at: Timestamp
    user_id: str


class SessionSummary(_Answer):
    id: str
    title: str | None
    created_at: Timestamp
    updated_at: Timestamp


class SessionList(_Answer):
    sessions: list[SessionSummary]
    total: int = Field(ge=0)


class Message(_Answer):
    id: str
    turn_id: str
    role: Literal["user", "assistant"]
    content: str = Field(description="The joined text.")
    parts: list[dict[str, Any]] = Field(
        description="The AI SDK UI message parts: text, reasoning, step-start, "
        "tool-<name> with input and output or errorText."
    )
    status: TurnStatus = Field(description="The turn's status.")
    created_at: Timestamp


def _queue_position() -> Any:
    return Field(
        ge=1,
        description="Its place in its user's queue of turns waiting for a running slot "
        "(1 is next); null when it is not waiting for one.",
    )


class ActiveTurn(_Answer):
    turn_id: str
    status: TurnStatus
    started_at: Timestamp | None
    last_event_id: str | None = Field(description="`<turn_id>:<seq>` of its last frame.")
    queue_position: int | None = _queue_position()
    waiting_for_approval: bool = Field(
        False, description="Paused until the user answers its tool approval requests."
    )


class SessionDetail(_Answer):
    id: str
    title: str | None
    created_at: Timestamp
    updated_at: Timestamp
    user_id: str
    messages: list[Message] = Field(description="One user and one assistant entry per turn.")
    active_turn: ActiveTurn | None


class TurnAccepted(_Answer):
    turn_id: str
    status: TurnStatus
    queue_position: int | None = _queue_position()


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    inputTokens: int
    outputTokens: int
    totalTokens: int


class WebhookDeliveryAnswer(_Answer):
    id: str = Field(description="Also the `webhook-id` header, the same on every retry.")
    url: str
    event: str | None = Field(description="`turn.completed`, `turn.failed`, `turn.cancelled`.")
    status: Literal["pending", "delivered", "failed"]
    attempts: int = Field(ge=0)
    last_status: int | None = Field(description="The receiver's last HTTP status.")
    last_error: str | None
    next_attempt_at: Timestamp | None = Field(description="While pending.")
    created_at: Timestamp
    delivered_at: Timestamp | None


class Turn(_Answer):
    turn_id: str
    status: TurnStatus
    attempt: int = Field(ge=0)
    error: str | None
    model: str
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    usage: Usage | None
    superseded_by: str | None = Field(
        description="The turn that answered its message again (a regenerate)."
    )
    steered_into: str | None = Field(
        None,
        description="A steering message's: the running turn that took it (and answers it).",
    )
    queue_position: int | None = _queue_position()
    webhooks: list[WebhookDeliveryAnswer] = Field(description="The turn's webhook delivery log.")
    waiting_for_approval: bool = Field(
        description="Paused until the user answers its tool approval requests."
    )
    approvals: list[ApprovalView] = Field(
        description="Its tool approval requests, with their answers, oldest first."
    )


class ApprovalView(_Answer):
    approval_id: str
    tool_call_id: str
    tool_name: str
    input: Any = Field(description="The call's arguments, as the model gave them.")
    status: Literal["waiting", "approved", "denied"]
    reason: str | None = Field(description="The answer's reason (a timeout gives one).")
    requested_at: Timestamp
    expires_at: Timestamp = Field(description="Unanswered by then, the request is denied.")
    decided_at: Timestamp | None


class ApprovalsAnswer(_Answer):
    turn_id: str
    status: TurnStatus
    waiting: bool = Field(description="The turn still waits for an answer.")
    approvals: list[ApprovalView] = Field(description="The requests of the turn's pause.")


class CancelAnswer(_Answer):
    cancelled: bool
    turn_id: str | None
    reason: Literal["timeout", "no_active_turn", "not_active"] | None = Field(
        None, description="Why nothing was cancelled (yet)."
    )


class Health(_Answer):
    status: Literal["ok"]


class Ready(_Answer):
    status: Literal["ready"]


class NotReady(_Answer):
    status: Literal["unavailable"]
    detail: str
    code: str


# -- parsing -------------------------------------------------------------------------


def parse_json(raw: bytes) -> Any:
    """``raw`` is a body already read under its size limit (``read_body``).
    Strict JSON: no ``NaN``, and no lone surrogate in a string (it could be
    neither stored nor sent back as UTF-8)."""
    if not raw.strip():
        raise BadRequest("request body is empty; send JSON", code="invalid_json")
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        hint = ""
        if any(word in str(exc) for word in ("surrogate", "hex escape", "unicode")):
            hint = " (strings must be valid Unicode: no lone surrogate \\ud800-\\udfff)"
        raise BadRequest(
            f"request body is not valid JSON: {exc}{hint}", code="invalid_json"
        ) from exc


def _bad_body(exc: ValidationError, what: str) -> TurnrelayError:
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"]) or "body"
    if (
        first["loc"]
        and first["loc"][-1] in ("message_id", "messageId", "id")
        and (first["type"] in ("string_pattern_mismatch", "string_type"))
    ):
        return BadRequest(
            f"`{loc}` must be 1-128 characters of letters, digits, '_', '-', '.', ':'",
            code="invalid_message_id",
        )
    if first["loc"] == ("message",) and first["type"] == "string_pattern_mismatch":
        return BadRequest("the message is empty", code="empty_message")
    if first["loc"] == ("webhook_url",) and first["type"] != "string_type":
        # as the target check answers (turnrelay.webhooks.check_target)
        return Unprocessable(f"webhook_url: {first['msg']}", code="bad_webhook")
    return BadRequest(f"invalid {what}: `{loc}`: {first['msg']}", code="invalid_body")


@dataclass(frozen=True, slots=True)
class SubmitBody:
    """What a submit asks for, from either body form."""

    message: str
    message_id: str | None
    model: str | None
    multitask: Multitask
    webhook_url: str | None = None
    # ``trigger: "regenerate-message"``: answer again, replacing the answer to
    # this message (``replaces``, an assistant message id; else the latest).
    regenerate: bool = False
    replaces: str | None = None
    # The AI SDK's approval flow: the chat's last message is the assistant's,
    # with answered approval requests; the request continues that answer.
    continues: str | None = None  # the assistant message id
    decisions: list[Decision] = field(default_factory=list)


def parse_submit(raw: bytes, *, max_message_bytes: int) -> SubmitBody:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    if "message" in body:
        try:
            own = SubmitRequest.model_validate(body)
        except ValidationError as exc:
            raise _bad_body(exc, "submit body") from None
        submit = SubmitBody(
            message=own.message,
            message_id=own.message_id,
            model=own.model,
            multitask=Multitask(own.multitask),
            webhook_url=own.webhook_url,
        )
    else:
        try:
            transport = TransportRequest.model_validate(body)
        except ValidationError as exc:
            raise _bad_body(exc, "transport body") from None
        submit = _from_transport(transport)
    if len(submit.message.encode()) > max_message_bytes:
        raise PayloadTooLarge(
            f"the message is over {max_message_bytes} bytes", code="message_too_large"
        )
    return submit


def _from_transport(transport: TransportRequest) -> SubmitBody:
    last_user = next(m for m in reversed(transport.messages) if isinstance(m, UserUIMessage))
    last = transport.messages[-1]
    if (
        isinstance(last, OtherUIMessage)
        and last.role == "assistant"
        and transport.trigger != "regenerate-message"
    ):
        # ``addToolApprovalResponse`` then ``sendMessage()``/``sendAutomaticallyWhen``:
        # no new user message, the answers ride in the assistant message's parts.
        return SubmitBody(
            message=last_user.text,
            message_id=None,
            model=transport.model,
            multitask=Multitask(transport.multitask),
            continues=transport.messageId or last.id,
            decisions=_decisions(last.parts),
        )
    # ``Chat.regenerate()`` resends the user message it answers again, with its
    # id: a request for a new turn, not a repeat of the first submit.
    regenerate = transport.trigger == "regenerate-message"
    message_id = None if regenerate else transport.messageId or last_user.id
    return SubmitBody(
        message=last_user.text,
        message_id=message_id,
        model=transport.model,
        multitask=Multitask(transport.multitask),
        webhook_url=transport.webhook_url,
        regenerate=regenerate,
        replaces=transport.messageId if regenerate else None,
    )


def _decisions(parts: list[dict[str, Any]]) -> list[Decision]:
    """The answered approval requests of an assistant message's tool parts."""
    found: list[Decision] = []
    for part in parts:
        if not isinstance(part, dict) or part.get("state") != "approval-responded":
            continue
        approval = part.get("approval")
        try:
            decision = ApprovalDecision.model_validate(
                {
                    "approval_id": approval.get("id") if isinstance(approval, dict) else None,
                    "approved": approval.get("approved") if isinstance(approval, dict) else None,
                    "reason": approval.get("reason") if isinstance(approval, dict) else None,
                }
            )
        except ValidationError as exc:
            raise _bad_body(exc, "approval response") from None
        found.append(Decision(decision.approval_id, decision.approved, decision.reason))
    if len(found) > MAX_DECISIONS:
        raise BadRequest(
            f"at most {MAX_DECISIONS} approval responses in one request", code="invalid_body"
        )
    return found


def parse_approvals(raw: bytes) -> list[Decision]:
    body = parse_json(raw)
    try:
        request = ApprovalsRequest.model_validate(body)
    except ValidationError as exc:
        raise _bad_body(exc, "approvals body") from None
    return [Decision(d.approval_id, d.approved, d.reason) for d in request.decisions]


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
    if not isinstance(body, dict):
        raise BadRequest("the cancel body is `{turn_id?}`", code="invalid_body")
    try:
        return CancelRequest.model_validate(body).turn_id
    except ValidationError as exc:
        raise BadRequest(
            f"the cancel body is `{{turn_id?}}`: {exc.errors(include_url=False)[0]['msg']}",
            code="invalid_body",
        ) from None
