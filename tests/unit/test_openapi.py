"""The OpenAPI document: valid OpenAPI 3.1 for every kind of configuration,
the same routes as the app, and the same rules as the validation (the chunk
builders and the request parsers are checked against it)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from turnrelay.api.app import create_app
from turnrelay.api.openapi import openapi_document
from turnrelay.api.schemas import NONBLANK, parse_cancel, parse_submit
from turnrelay.errors import BadRequest, PayloadTooLarge, Unprocessable
from turnrelay.events import chunks
from turnrelay.events.memory import MemoryEventLog
from turnrelay.lifecycle import terminal_chunks
from turnrelay.metrics import Metrics
from turnrelay.queue.memory import MemoryTurnQueue
from turnrelay.settings import Settings
from turnrelay.storage.memory import MemoryObjectStore
from turnrelay.store.base import TurnStatus
from turnrelay.store.sql import SqlChatStore

SETTINGS = {
    "open": {"model": "openai:fake"},
    "api keys": {"model": "openai:fake", "models": "openai:fake,openai:b", "api_keys": "t=u"},
    "jwt": {"model": "openai:fake", "jwt_secret": "s" * 32},
    "webhooks": {"model": "openai:fake", "webhook_secret": "w" * 32, "api_keys": "t=u"},
}


def _doc(**kwargs: Any) -> dict[str, Any]:
    doc = openapi_document(Settings(**kwargs))
    return json.loads(json.dumps(doc))  # as served


def _validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**doc, "$ref": f"#/components/schemas/{name}"})


@pytest.mark.parametrize("kind", SETTINGS)
def test_the_document_is_valid_openapi_3_1(kind: str) -> None:
    doc = _doc(**SETTINGS[kind])
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    for item in doc["paths"].values():
        for op in item.values():
            for status, answer in op["responses"].items():
                if status.startswith(("4", "5")) and "content" in answer:
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema["$ref"].endswith(("/ErrorAnswer", "/NotReady"))


def test_the_auth_schemes_are_the_configured_ones() -> None:
    assert "security" not in json.dumps(_doc(**SETTINGS["open"])["paths"]).replace(
        '"security": []', ""
    )
    keys = _doc(**SETTINGS["api keys"])["paths"]["/api/chat/sessions"]["post"]
    assert keys["security"] == [{"apiKey": []}] and "401" in keys["responses"]
    both = _doc(api_keys="t=u", jwt_secret="s" * 32)["paths"]["/api/chat/sessions"]["post"]
    assert both["security"] == [{"apiKey": []}, {"jwt": []}]
    health = _doc(**SETTINGS["api keys"])["paths"]["/health"]["get"]
    assert health["security"] == [] and "401" not in health["responses"]


async def test_every_route_of_the_app_is_documented(tmp_path: Any) -> None:
    settings = Settings(model="openai:fake", api_keys="t=u")
    store = SqlChatStore(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite")
    app = create_app(
        settings=settings,
        store=store,
        events=MemoryEventLog(),
        queue=MemoryTurnQueue(),
        metrics=Metrics("serve", 1),
        objects=MemoryObjectStore(),
        readiness=_ready,
    )
    routes = {
        (method, r.path)
        for r in app.routes
        if isinstance(r, Route)
        for method in (r.methods or ()) - {"HEAD"}
    }
    documented = {
        (method.upper(), path)
        for path, item in openapi_document(settings)["paths"].items()
        for method in item
    }
    assert routes == documented
    await store.shutdown()


async def _ready() -> None:
    return None


def test_every_chunk_turnrelay_writes_passes_the_documented_schema() -> None:
    validator = _validator(_doc(**SETTINGS["open"]), "UIMessageChunk")
    written = [
        chunks.start("m1"),
        chunks.start_step(),
        chunks.text_start("p"),
        chunks.text_delta("p", "hi"),
        chunks.text_end("p"),
        chunks.reasoning_start("r"),
        chunks.reasoning_delta("r", "hmm"),
        chunks.reasoning_end("r"),
        chunks.tool_input_start("c", "calc"),
        chunks.tool_input_delta("c", '{"x"'),
        chunks.tool_input_available("c", "calc", {"x": 1}),
        chunks.tool_output_available("c", {"y": 2}),
        chunks.tool_output_error("c", "boom"),
        chunks.data("turn-retry", {"attempt": 2}, transient=True),
        chunks.data("stream-reset", {"seq": 7}),
        chunks.finish_step(),
        *terminal_chunks(TurnStatus.FAILED, "bad", {"inputTokens": 1}),
        *terminal_chunks(TurnStatus.CANCELLED, None),
        *terminal_chunks(TurnStatus.COMPLETED, None),
    ]
    for chunk in written:
        errors = [e.message for e in validator.iter_errors(json.loads(chunks.encode(chunk)))]
        assert not errors, (chunk, errors)
    # and strict, like the SDK's: an unknown key, an unknown type, a null are refused
    for bad in (
        {"type": "text-delta", "id": "p", "delta": "x", "extra": 1},
        {"type": "nope"},
        {"type": "abort", "reason": None},
        {"type": "error"},
    ):
        assert not validator.is_valid(bad), bad


def test_the_sse_event_schema_takes_frames_and_done() -> None:
    validator = _validator(_doc(**SETTINGS["open"]), "SseEvent")
    frame = {"event": "message", "id": f"{'a' * 8}-{'b' * 4}-{'c' * 4}-{'d' * 4}-{'e' * 12}:3"}
    assert validator.is_valid({**frame, "data": '{"type":"start-step"}'})
    assert validator.is_valid({**frame, "data": "[DONE]"})
    assert not validator.is_valid({**frame, "id": "nope", "data": "[DONE]"})


# -- the document and the parsers agree --------------------------------------------


def _submit_schema(doc: dict[str, Any]) -> jsonschema.Draft202012Validator:
    op = doc["paths"]["/api/chat/sessions/{session_id}/turns"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**doc, **schema})


USER = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hello"}]}
BODIES: list[tuple[Any, str | None]] = [
    ({"message": "hi"}, None),
    ({"message": "hi", "message_id": "m-1", "multitask": "reject", "model": "openai:fake"}, None),
    ({"message": "hi", "unknown": "ignored"}, None),
    ({"message": ""}, "empty_message"),
    ({"message": " \n\t\x1c"}, "empty_message"),
    ({"message": 42}, "invalid_body"),
    ({"message": "a\x00b"}, "invalid_body"),
    (
        {"messages": [{**USER, "parts": [*USER["parts"], {"type": "text", "text": "\x00"}]}]},
        "invalid_body",
    ),
    ({"message": "hi", "multitask": "sometimes"}, "invalid_body"),
    ({"message": "hi", "message_id": "x" * 129}, "invalid_message_id"),
    ({"message": "hi", "message_id": "no spaces"}, "invalid_message_id"),
    ({"message": "hi", "webhook_url": "https://example.com/hook"}, "webhooks"),
    ({"id": "c", "messages": [USER], "trigger": "submit-message", "messageId": None}, None),
    ({"messages": [{"id": "a", "role": "assistant", "parts": []}, USER]}, None),
    ({"messages": []}, "invalid_body"),
    ({"messages": [{"id": "a", "role": "assistant", "parts": []}]}, "invalid_body"),
    ({"messages": [{**USER, "parts": [{"type": "file", "url": "x"}]}]}, "invalid_body"),
    ({"messages": [{**USER, "parts": [{"type": "text", "text": "  "}]}]}, "invalid_body"),
    ({"messages": [{**USER, "id": "bad id"}]}, "invalid_message_id"),
    ({"messages": [USER], "trigger": "something"}, "invalid_body"),
    ({"messages": [{"role": "user", "content": "v4 form"}]}, "invalid_body"),
]


@pytest.mark.parametrize(("body", "code"), BODIES)
def test_the_submit_schema_and_the_parser_agree(body: Any, code: str | None) -> None:
    """What the document accepts the parser accepts, and what it refuses the
    parser refuses (webhooks: the document of a server without them refuses a URL,
    and the control layer answers 422 ``webhooks_disabled``)."""
    doc = _doc(model="openai:fake", models="openai:fake,openai:b")
    documented = _submit_schema(doc).is_valid(body)
    raw = json.dumps(body).encode()
    if code == "webhooks":
        assert not documented
        parse_submit(raw, max_message_bytes=1000)  # the parser passes it on
        on = _submit_schema(_doc(model="openai:fake", webhook_secret="w" * 32))
        assert on.is_valid(body)
        for bad in ("ftp://example.com/x", "not a url", "http://u:p@example.com/", "http://a/\x00"):
            assert not on.is_valid({**body, "webhook_url": bad})
            with pytest.raises(Unprocessable) as refused:
                parse_submit(json.dumps({**body, "webhook_url": bad}).encode(), max_message_bytes=9)
            assert refused.value.code == "bad_webhook"
        return
    if code is None:
        parse_submit(raw, max_message_bytes=1000)
        assert documented
    else:
        with pytest.raises(BadRequest) as caught:
            parse_submit(raw, max_message_bytes=1000)
        assert caught.value.code == code
        assert not documented


def test_a_lone_surrogate_is_a_bad_request_not_a_server_error() -> None:
    for raw in (
        b'{"message": "\\ud800"}',
        b'{"message": "a\\udfffb"}',
        b'{"message": "\xed\xa0\x80"}',
    ):
        with pytest.raises(BadRequest) as caught:
            parse_submit(raw, max_message_bytes=1000)
        assert caught.value.code == "invalid_json"
        assert "surrogate" in caught.value.detail or "unicode" in caught.value.detail.lower()
    # a surrogate pair is a character like any other
    body = parse_submit(b'{"message": "\\ud83d\\ude00"}', max_message_bytes=1000)
    assert body.message == "😀"


def test_the_message_size_counts_bytes() -> None:
    with pytest.raises(PayloadTooLarge):
        parse_submit(json.dumps({"message": "é" * 6}).encode(), max_message_bytes=11)
    parse_submit(json.dumps({"message": "é" * 5}).encode(), max_message_bytes=11)


def test_the_cancel_body() -> None:
    turn = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    assert parse_cancel(b"") is None
    assert parse_cancel(b"{}") is None
    assert parse_cancel(json.dumps({"turn_id": turn}).encode()) == turn
    for bad in (b"[]", b'{"turn_id": "x"}', b'{"turn_id": 1}', b'{"other": 1}'):
        with pytest.raises(BadRequest):
            parse_cancel(bad)


def test_white_space_is_spelled_out_as_python_has_it() -> None:
    """The document's patterns name white space character by character: ``\\s``
    is narrower in JSON Schema's ECMA-262 regexes than in Python."""
    doc = json.dumps(_doc(**SETTINGS["webhooks"]))
    assert "\\\\s" not in doc and "\\\\S" not in doc
    for code in range(0x110000):
        if not 0xD800 <= code < 0xE000:
            assert (NONBLANK.search(chr(code)) is None) == chr(code).isspace(), hex(code)
