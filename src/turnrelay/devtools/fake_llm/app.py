"""``build_app``: the fake server's routes as a Starlette app."""

from __future__ import annotations

import contextlib
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from turnrelay.devtools.fake_llm import anthropic_wire, openai_wire
from turnrelay.devtools.fake_llm.anthropic_wire import _anthropic_error
from turnrelay.devtools.fake_llm.record import _Recorder
from turnrelay.devtools.fake_llm.script import MODEL_ID


def build_app(record_path: str | None = None) -> Starlette:
    """The fake server as an ASGI app; ``record_path`` appends JSON lines (see the
    package docstring)."""
    recorder = _Recorder(record_path)

    async def models(request: Request) -> Response:
        recorder.request(request.url.path, None)
        model: dict[str, Any] = {
            "id": MODEL_ID,
            "object": "model",
            "created": 0,
            "owned_by": "turnrelay",
            # The Anthropic shape of the same entry.
            "type": "model",
            "display_name": "Fake",
            "created_at": "1970-01-01T00:00:00Z",
        }
        return JSONResponse(
            {"object": "list", "data": [model], "has_more": False, "first_id": MODEL_ID}
        )

    async def read_body(request: Request) -> tuple[int, dict[str, Any] | None]:
        try:
            body = await request.json()
        except ValueError:
            return recorder.request(request.url.path, None), None
        index = recorder.request(request.url.path, body)
        return index, body if isinstance(body, dict) else None

    async def chat_completions(request: Request) -> Response:
        index, body = await read_body(request)
        return await openai_wire.chat_completions(recorder, index, body)

    async def messages(request: Request) -> Response:
        index, body = await read_body(request)
        return await anthropic_wire.messages(recorder, index, body)

    async def count_tokens(request: Request) -> Response:
        _, body = await read_body(request)
        return anthropic_wire.count_tokens(body)

    async def anything_else(request: Request) -> Response:
        body: Any = None
        with contextlib.suppress(ValueError):
            body = await request.json()
        recorder.request(request.url.path, body)
        return _anthropic_error(404, f"the fake LLM has no {request.method} {request.url.path}")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/{path:path}", anything_else, methods=methods),
        ]
    )
