"""Bad input gets a clear JSON error, and nothing is persisted (real `serve` process)."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.e2e.conftest import new_session
from tests.procs import read_sse

pytestmark = pytest.mark.slow


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code
    assert body["detail"] and "Traceback" not in body["detail"]


def assert_nothing_persisted(client: httpx.Client, sid: str) -> None:
    session = client.get(f"/api/chat/sessions/{sid}").json()
    assert session["messages"] == [] and session["active_turn"] is None


def post_stream(client: httpx.Client, sid: str, **kwargs: object) -> httpx.Response:
    return client.post(f"/api/chat/sessions/{sid}/stream", **kwargs)  # type: ignore[arg-type]


def test_malformed_json(client: httpx.Client) -> None:
    sid = new_session(client)
    r = post_stream(
        client, sid, content=b'{"message": "hi"', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "invalid_json")
    r = post_stream(client, sid, content=b"", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    r = post_stream(client, sid, json=["not", "an", "object"])
    assert_error(r, 400, "invalid_body")
    r = post_stream(client, sid, json={"message": 42})
    assert_error(r, 400, "invalid_body")
    r = post_stream(client, sid, json={"message": "hi", "multitask": "sometimes"})
    assert_error(r, 400, "invalid_body")
    r = post_stream(client, sid, json={"message": "hi", "message_id": "x" * 129})
    assert_error(r, 400, "invalid_message_id")
    assert_nothing_persisted(client, sid)


def test_message_size_limits(client: httpx.Client) -> None:
    sid = new_session(client)
    assert_error(post_stream(client, sid, json={"message": ""}), 400, "empty_message")
    assert_error(post_stream(client, sid, json={"message": " \n\t "}), 400, "empty_message")
    over = "x" * (64 * 1024 + 1)
    assert_error(post_stream(client, sid, json={"message": over}), 413, "message_too_large")
    # multi-byte characters count as bytes: 16385 four-byte characters are over 64 KiB
    assert_error(post_stream(client, sid, json={"message": "😀" * 16385}), 413, "message_too_large")
    huge = b'{"message": "' + b"y" * (5 * 1024 * 1024) + b'"}'
    r = post_stream(client, sid, content=huge, headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert_nothing_persisted(client, sid)
    exactly = "z" * (64 * 1024)  # the limit itself is allowed
    r = client.post(f"/api/chat/sessions/{sid}/turns", json={"message": exactly})
    assert r.status_code == 202


def test_unknown_and_foreign_sessions(client: httpx.Client, bob: httpx.Client) -> None:
    sid = new_session(client)
    unknown = str(uuid.uuid4())
    for path in ("", "/stream", "/cancel", f"/turns/{uuid.uuid4()}"):
        method = "POST" if path == "/cancel" else "GET"
        assert_error(
            client.request(method, f"/api/chat/sessions/{unknown}{path}"), 404, "session_not_found"
        )
        assert_error(
            bob.request(method, f"/api/chat/sessions/{sid}{path}"), 404, "session_not_found"
        )
    assert_error(
        bob.post(f"/api/chat/sessions/{sid}/stream", json={"message": "hi"}),
        404,
        "session_not_found",
    )
    assert_error(bob.delete(f"/api/chat/sessions/{sid}"), 404, "session_not_found")
    assert_error(client.get("/api/chat/sessions/not-a-uuid"), 404, "session_not_found")
    assert bob.get("/api/chat/sessions").json()["sessions"] == [] or all(
        s["id"] != sid for s in bob.get("/api/chat/sessions").json()["sessions"]
    )
    assert_nothing_persisted(client, sid)


def test_auth_required(server: object, client: httpx.Client) -> None:
    base = str(client.base_url)
    assert_error(httpx.post(f"{base}/api/chat/sessions"), 401, "unauthorized")
    assert_error(
        httpx.get(f"{base}/api/chat/sessions", headers={"authorization": "Bearer wrong"}),
        401,
        "unauthorized",
    )


def test_malformed_and_mismatched_cursors(client: httpx.Client) -> None:
    sid = new_session(client)
    with client.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": "cur"}) as r:
        sse = read_sse(r)
    cursor = sse.ids[1]
    turn_id = cursor.split(":")[0]
    base = f"/api/chat/sessions/{sid}/stream"
    for bad in ("garbage", f"{turn_id}", f"{turn_id}:-1", f"{turn_id}:x", "a:1"):
        assert_error(client.get(base, headers={"Last-Event-ID": bad}), 400, "invalid_cursor")
        assert_error(client.get(base, params={"after": bad}), 400, "invalid_cursor")
    r = client.get(base, headers={"Last-Event-ID": cursor}, params={"after": f"{turn_id}:1"})
    assert_error(r, 400, "invalid_cursor")
    r = client.get(base, params={"after": cursor, "turn_id": str(uuid.uuid4())})
    assert_error(r, 400, "invalid_cursor")
    # a well-formed cursor of an unknown turn: 404; one past the end of the log: 410
    assert_error(client.get(base, params={"after": f"{uuid.uuid4()}:3"}), 404, "turn_not_found")
    assert_error(client.get(base, params={"after": f"{turn_id}:999"}), 410, "gone")
    assert_error(client.get(base, params={"turn_id": str(uuid.uuid4())}), 404, "turn_not_found")


def test_unknown_model(client: httpx.Client) -> None:
    sid = new_session(client)
    r = post_stream(client, sid, json={"message": "hi", "model": "openai:gpt-nope"})
    assert_error(r, 422, "unknown_model")
    assert "openai:fake" in r.json()["detail"]
    assert_nothing_persisted(client, sid)
    ok = client.post(
        f"/api/chat/sessions/{sid}/turns", json={"message": "hi", "model": "openai:other"}
    )
    assert ok.status_code == 202


def test_reused_message_id(client: httpx.Client) -> None:
    sid = new_session(client)
    mid = str(uuid.uuid4())
    with client.stream(
        "POST", f"/api/chat/sessions/{sid}/stream", json={"message": "idem", "message_id": mid}
    ) as r:
        first = read_sse(r)
    with client.stream(
        "POST", f"/api/chat/sessions/{sid}/stream", json={"message": "idem", "message_id": mid}
    ) as r:
        again = read_sse(r)
    assert again.events == first.events  # same turn, same stream, not a second run
    r = post_stream(client, sid, json={"message": "different", "message_id": mid})
    assert_error(r, 409, "message_id_conflict")
    session = client.get(f"/api/chat/sessions/{sid}").json()
    assert [m["content"] for m in session["messages"]] == ["idem", "Echo: idem"]


def test_list_limits(client: httpx.Client) -> None:
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"offset": -1}):
        assert_error(client.get("/api/chat/sessions", params=params), 400, "invalid_param")
    assert client.get("/api/chat/sessions", params={"limit": 1}).status_code == 200
    for raw in ("+5", " 5", "1_0", "\u0665", "5.0"):  # int() takes all but the last
        assert_error(client.get("/api/chat/sessions", params={"limit": raw}), 400, "invalid_param")


def test_invalid_unicode_is_a_bad_request(client: httpx.Client) -> None:
    """A lone surrogate (valid JSON escape, not Unicode) could be neither stored
    nor sent back as UTF-8: 400, never a 500."""
    sid = new_session(client)
    for raw in (b'{"message": "\\ud800"}', b'{"message": "hi", "model": "\\udfff"}'):
        r = post_stream(client, sid, content=raw, headers={"content-type": "application/json"})
        assert_error(r, 400, "invalid_json")
        assert "surrogate" in r.json()["detail"]
    body = {"messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "x"}]}]}
    raw = json.dumps(body).replace('"x"', '"\\ud83dx"').encode()
    r = post_stream(client, sid, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert_nothing_persisted(client, sid)


def test_transport_bodies_without_a_user_text(client: httpx.Client) -> None:
    sid = new_session(client)
    assistant = {"id": "a", "role": "assistant", "parts": [{"type": "text", "text": "hi"}]}
    for messages in (
        [],
        [assistant],
        [{"id": "u", "role": "user", "parts": [{"type": "file", "url": "x"}]}],
        [{"id": "u", "role": "user", "parts": [{"type": "text", "text": " "}]}],
        [{"id": "u", "role": "robot", "parts": []}],
    ):
        assert_error(post_stream(client, sid, json={"messages": messages}), 400, "invalid_body")
    assert_nothing_persisted(client, sid)


def test_a_method_a_path_lacks_is_405_with_allow(client: httpx.Client) -> None:
    sid = new_session(client)
    for method, path, allow in (
        ("PUT", "/api/chat/sessions", {"GET", "POST"}),
        ("PATCH", f"/api/chat/sessions/{sid}", {"GET", "DELETE"}),
        ("DELETE", f"/api/chat/sessions/{sid}/stream", {"GET", "POST"}),
        ("GET", f"/api/chat/sessions/{sid}/cancel", {"POST"}),
        ("POST", "/health", {"GET"}),
    ):
        r = client.request(method, path)
        assert_error(r, 405, "method_not_allowed")
        assert set(r.headers["allow"].split(", ")) - {"HEAD"} == allow, (path, r.headers)
