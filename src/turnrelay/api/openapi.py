"""The OpenAPI 3.1 document of this server, built from the models that
validate the requests and shape the answers (``api/schemas.py``,
``api/stream_schema.py``) and from ``OPERATIONS``, the table the app builds
its routes from (``api/app.py``), so it cannot drift from the code.

It describes the server as configured: the auth schemes that are on, the
models a request may name, whether webhooks are on. ``OPERATIONS`` lists every
public route with its parameters and every status it can answer; each error is
``ErrorAnswer`` (``{detail, code}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from turnrelay import __version__
from turnrelay.api import schemas as s
from turnrelay.api.cursor import CURSOR_PATTERN
from turnrelay.api.stream_schema import SseEvent, UIMessageChunk
from turnrelay.settings import Settings

PREFIX = "/api/chat"
SESSION = f"{PREFIX}/sessions/{{session_id}}"

# Why each error status may be answered, for the document's descriptions.
ERRORS = {
    400: "Malformed input: JSON, body, parameter or cursor (`code` says which).",
    401: "No or a bad bearer token (`code`: `unauthorized`, `token_expired`, ...).",
    404: "No such session or turn, or one of another user.",
    409: "`message_id` reused with another message; `multitask: reject` "
    "with an active turn (`turn_id` names it); tool approvals: `approval_already_answered`, "
    "`turn_not_waiting`, `approvals_pending`.",
    410: "The cursor's frames are expired or trimmed.",
    413: "The body or the message is over its limit.",
    422: "Understood but refused: `unknown_model`, `webhooks_disabled`, "
    "`webhook_target_refused`, `bad_webhook`.",
    429: "A turn cap is reached; retry after `Retry-After` seconds.",
    503: "A backend is unreachable, or this process is shutting down; retry.",
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
SSE_HEADERS = {
    "x-vercel-ai-ui-message-stream": {
        "description": "The AI SDK stream protocol version.",
        "schema": {"const": "v1"},
    },
    "x-turn-id": {"description": "The turn streamed.", "schema": {"type": "string"}},
}
UUID = {"type": "string", "pattern": s.UUID_PATTERN}
# Answers that are not one of the models.
MEDIA: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("text/plain", {"type": "string"}),
    "html": ("text/html", {"type": "string"}),
    "json": ("application/json", {"type": "object"}),
}


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    operation_id: str
    handler: str  # the ``ChatRoutes`` method that answers it (``DocsRoutes`` for "docs")
    summary: str
    ok: dict[int, Any]  # status -> model, "sse", a MEDIA key, or None (no body)
    errors: tuple[int, ...]
    body: type[BaseModel] | tuple[type[BaseModel], ...] | None = None
    body_required: bool = True
    params: list[dict[str, Any]] = field(default_factory=list)
    tag: str = "chat"
    secured: bool = True
    description: str = ""


def _path(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": UUID, "description": what}


SESSION_ID = _path("session_id", "The session's id.")
SUBMIT = (s.SubmitRequest, s.TransportRequest)
SUBMIT_ERRORS = (400, 404, 409, 413, 422, 429, 503)

OPERATIONS: list[Op] = [  # every public route
    Op(
        "post",
        f"{PREFIX}/sessions",
        "createSession",
        "create_session",
        "Create a session",
        {201: s.SessionCreated},
        (503,),
        body=None,
    ),
    Op(
        "get",
        f"{PREFIX}/sessions",
        "listSessions",
        "list_sessions",
        "List the user's sessions, newest first",
        {200: s.SessionList},
        (400, 503),
        params=[
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
            },
            {
                "name": "offset",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 0, "maximum": 10**9, "default": 0},
            },
        ],
    ),
    Op(
        "get",
        SESSION,
        "getSession",
        "get_session",
        "A session with its messages and active turn",
        {200: s.SessionDetail},
        (404, 503),
        params=[SESSION_ID],
    ),
    Op(
        "delete",
        SESSION,
        "deleteSession",
        "delete_session",
        "Cancel a session's turns and delete it",
        {204: None},
        (404, 503),
        params=[SESSION_ID],
    ),
    Op(
        "post",
        f"{SESSION}/stream",
        "submitAndStream",
        "post_stream",
        "Submit a turn and stream it",
        {200: "sse"},
        SUBMIT_ERRORS,
        body=SUBMIT,
        params=[SESSION_ID],
        description="The response is the new turn's SSE stream (or, for a `message_id` "
        "already used, that turn's). Either body form is accepted. A transport body "
        "whose last message is the assistant's, with answered tool approval requests "
        "(`state: approval-responded`), answers them and streams the rest of that "
        "turn from its pause.",
    ),
    Op(
        "post",
        f"{SESSION}/turns",
        "submitTurn",
        "post_turn",
        "Submit a turn without streaming it",
        {202: s.TurnAccepted},
        SUBMIT_ERRORS,
        body=SUBMIT,
        params=[SESSION_ID],
    ),
    Op(
        "get",
        f"{SESSION}/stream",
        "readStream",
        "get_stream",
        "Read (resume) a turn's stream",
        {200: "sse", 204: None},
        (400, 404, 410, 503),
        params=[
            SESSION_ID,
            {
                "name": "after",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "pattern": CURSOR_PATTERN},
                "description": "Resume after this cursor (`<turn_id>:<seq>`, an SSE `id`).",
            },
            {
                "name": "turn_id",
                "in": "query",
                "required": False,
                "schema": UUID,
                "description": "This turn from its first frame.",
            },
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": CURSOR_PATTERN},
                "description": "As `after`; both given must agree.",
            },
        ],
        description="With a cursor: the frames after it, then live frames until `[DONE]`. "
        "With `turn_id`: that turn from its first frame. With neither: the running "
        "(or queued head) turn from its first frame, or 204 when the session has none.",
    ),
    Op(
        "get",
        f"{SESSION}/turns/{{turn_id}}",
        "getTurn",
        "get_turn",
        "A turn and its webhook deliveries",
        {200: s.Turn},
        (404, 503),
        params=[SESSION_ID, _path("turn_id", "The turn's id.")],
    ),
    Op(
        "post",
        f"{SESSION}/turns/{{turn_id}}/approvals",
        "answerApprovals",
        "post_approvals",
        "Approve or deny a waiting turn's tool calls",
        {200: s.ApprovalsAnswer},
        (400, 404, 409, 413, 503),
        body=s.ApprovalsRequest,
        params=[SESSION_ID, _path("turn_id", "The turn's id.")],
        description="The turn paused before running tool calls that need the user's "
        "approval (its stream showed `tool-approval-request` chunks and ended with "
        "`finish`, `finishReason: tool-calls`). Once every request is answered the "
        "turn goes on: approved calls run, denied ones are reported to the model. "
        "Repeating an answer is harmless; 409 `approval_already_answered` for an "
        "answer that contradicts one given (or a timeout), 409 `turn_not_waiting` "
        "when the turn waits for nothing. The AI SDK's own flow (the chat's "
        "approval responses, sent to `POST …/stream`) does the same and streams "
        "the rest of the turn.",
    ),
    Op(
        "post",
        f"{SESSION}/cancel",
        "cancelTurn",
        "cancel",
        "Cancel the head turn, or the named one",
        {200: s.CancelAnswer, 202: s.CancelAnswer},
        (400, 404, 413, 503),
        body=s.CancelRequest,
        body_required=False,
        params=[SESSION_ID],
        description="200 once the turn's terminal frame is logged (or with `reason` when "
        "nothing was active); 202 with `reason: timeout` when it has not ended after 5 s.",
    ),
    Op(
        "get",
        "/health",
        "health",
        "health",
        "Liveness",
        {200: s.Health},
        (),
        tag="operations",
        secured=False,
    ),
    Op(
        "get",
        "/ready",
        "ready",
        "ready",
        "Readiness: the backends are reachable",
        {200: s.Ready, 503: s.NotReady},
        (),
        tag="operations",
        secured=False,
    ),
    Op(
        "get",
        "/openapi.json",
        "openapi",
        "openapi",
        "This document",
        {200: "json"},
        (),
        tag="docs",
        secured=False,
    ),
    Op(
        "get",
        "/docs",
        "docs",
        "page",
        "A page that renders this document (no CDN: it works offline)",
        {200: "html"},
        (),
        tag="docs",
        secured=False,
    ),
    Op(
        "get",
        "/metrics",
        "metrics",
        "metrics_text",
        "Prometheus metrics",
        {200: "text"},
        (),
        tag="operations",
        secured=False,
    ),
]


def _component_schemas() -> dict[str, Any]:
    requests: list[type[BaseModel]] = [
        s.SubmitRequest, s.TransportRequest, s.CancelRequest, s.ApprovalsRequest,
    ]  # fmt: skip
    answers: list[type[BaseModel]] = [
        s.ErrorAnswer, s.SessionCreated, s.SessionList, s.SessionDetail, s.TurnAccepted,
        s.Turn, s.CancelAnswer, s.ApprovalsAnswer, s.Health, s.Ready, s.NotReady, SseEvent,
        UIMessageChunk,
    ]  # fmt: skip
    _, top = models_json_schema(
        [(m, "validation") for m in requests] + [(m, "serialization") for m in answers],
        ref_template="#/components/schemas/{model}",
    )
    defs: dict[str, Any] = top["$defs"]
    return defs


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _response(what: Any, description: str) -> dict[str, Any]:
    if what is None:
        return {"description": description}
    if what == "sse":
        return {
            "description": description + " An SSE stream: one event per frame.",
            "headers": SSE_HEADERS,
            "content": {"text/event-stream": {"schema": _ref(SseEvent)}},
        }
    if what in MEDIA:
        media, schema = MEDIA[what]
        return {"description": description, "content": {media: {"schema": schema}}}
    return {"description": description, "content": {"application/json": {"schema": _ref(what)}}}


def _operation(op: Op, security: list[dict[str, list[str]]]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, what in op.ok.items():
        responses[str(status)] = _response(what, "OK" if status < 300 else "Not ready")
    errors = ((401,) if security and op.secured else ()) + op.errors
    for status in sorted(errors):
        answer = _response(s.ErrorAnswer, ERRORS[status])
        if status in (429, 503):
            answer["headers"] = RETRY_AFTER
        responses[str(status)] = answer
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": responses,
    }
    if op.description:
        out["description"] = op.description
    if op.params:
        out["parameters"] = op.params
    if op.body is not None:
        bodies = op.body if isinstance(op.body, tuple) else (op.body,)
        schema = _ref(bodies[0]) if len(bodies) == 1 else {"oneOf": [_ref(b) for b in bodies]}
        out["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": schema}},
        }
    out["security"] = security if op.secured else []
    return out


def _configure(schemas: dict[str, Any], settings: Settings) -> None:
    """What this server's settings decide: the models a request may name, and
    whether a ``webhook_url`` is accepted at all."""
    models = settings.allowed_models()
    webhooks_on = bool(settings.webhook_secret)
    for name in ("SubmitRequest", "TransportRequest"):
        props = schemas[name]["properties"]
        props["model"] = {
            "anyOf": [{"enum": list(models)}, {"type": "null"}] if models else [{"type": "null"}],
            "default": None,
            "description": "`provider:model`, one of this server's allowed models; "
            "none: the default model.",
        }
        if not webhooks_on:
            props["webhook_url"] = {
                "type": "null",
                "description": "Webhooks are off on this server (no "
                "`TURNRELAY_WEBHOOK_SECRET`): a URL answers 422 `webhooks_disabled`.",
            }


SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "One of `TURNRELAY_API_KEYS` (`token=user_id,...`).",
    },
    "jwt": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A JWT of the product's sign-in: HS256 with `TURNRELAY_JWT_SECRET`, "
        "or RS256/ES256 from `TURNRELAY_JWT_JWKS_URL`; the user is its "
        "`TURNRELAY_JWT_USER_CLAIM` claim.",
    },
}


def openapi_document(settings: Settings) -> dict[str, Any]:
    schemas = _component_schemas()
    _configure(schemas, settings)
    security: list[dict[str, list[str]]] = []
    if settings.user_tokens():
        security.append({"apiKey": []})
    if settings.jwt_enabled():
        security.append({"jwt": []})
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, security)
    paths[f"{PREFIX}/sessions"]["post"]["responses"]["201"]["links"] = _session_links()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "turnrelay",
            "version": __version__,
            "description": "AI copilot chat: turns run on executors and stream over SSE in "
            "the AI SDK UI Message Stream protocol; a reader resumes with the SSE `id`. "
            "Errors are `{detail, code}`."
            + ("" if security else " This server has no auth configured: one local user."),
        },
        "tags": [
            {"name": "chat", "description": "Sessions, turns and their streams."},
            {"name": "operations", "description": "Liveness, readiness, metrics."},
            {"name": "docs", "description": "This document and its page."},
        ],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES},
    }


def _session_links() -> dict[str, Any]:
    """A created session's id is the ``session_id`` of the session routes."""
    param = {"session_id": "$response.body#/id"}
    return {
        op.operation_id: {"operationId": op.operation_id, "parameters": param}
        for op in OPERATIONS
        if op.path.startswith(SESSION) and "turn_id" not in op.path
    }
