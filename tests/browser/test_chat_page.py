"""The chat page (`src/turnrelay/web/`) in headless Chromium against real processes.

`tests/browser/chat.spec.mjs` drives Debian's `/usr/bin/chromium` through
`playwright-core` (no downloaded browsers) against a real `turnrelay serve` with a
real `turnrelay fake-llm` behind it, runs one scenario per call and prints what it
measured as JSON; the assertions live here. Screenshots are written under each
test's `tmp_path` and their paths printed (`pytest -s` shows them).

CI installs the prerequisites (`npm ci --prefix tests/browser`, `apt-get install
chromium`), never the test: without them the tests skip locally and fail under
``CI``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require_node_package, skip_or_fail
from tests.procs import FakeLLMProc, Proc, start_fake_llm, start_serve, tokens

pytestmark = [pytest.mark.node, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "chat.spec.mjs"
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "tok"
# One scenario takes a few seconds; the bound only stops a wedged browser.
DRIVER_TIMEOUT = 90.0


def require_browser() -> str:
    """The `node` binary; skip locally, fail under CI, when a prerequisite is missing."""
    node = require_node_package(HERE, "playwright-core")
    if not CHROMIUM.exists():
        skip_or_fail(f"{CHROMIUM} is missing: run `apt-get install -y chromium`")
    return node


@pytest.fixture(scope="module")
def node() -> str:
    return require_browser()


@pytest.fixture(scope="module")
def llm(node: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLLMProc]:
    fake = start_fake_llm(tmp_path_factory.mktemp("llm"))
    yield fake
    fake.proc.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    """No API keys: one local user, as `turnrelay serve` runs on a laptop."""
    proc = start_serve(tmp_path_factory.mktemp("serve"), llm)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    proc = start_serve(
        tmp_path_factory.mktemp("serve-keyed"), llm, {"TURNRELAY_API_KEYS": f"{TOKEN}=alice"}
    )
    yield proc
    proc.stop()


def drive(node: str, server: Proc, scenario: str, tmp: Path, **extra: Any) -> dict[str, Any]:
    config = {"baseUrl": server.url, "outDir": str(tmp / "screenshots"), "scenario": scenario}
    config.update(extra)
    try:
        done = subprocess.run(
            [node, str(DRIVER), json.dumps(config)],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the browser driver ran over {DRIVER_TIMEOUT:g} s:\n{exc.stderr}")
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output from the driver (exit {done.returncode}):\n{done.stderr}"
    out: dict[str, Any] = json.loads(lines[-1])
    for path in out["screenshots"]:
        print(f"screenshot: {path}")
    assert out["ok"], (
        f"{out.get('error')}\nscreenshots: {out['screenshots']}\n{server.log()[-3000:]}"
    )
    assert out["pageErrors"] == []
    result: dict[str, Any] = out["result"]
    return result


def test_send_and_see_the_reply_stream(node: str, server: Proc, tmp_path: Path) -> None:
    r = drive(node, server, "send", tmp_path)
    assert r["text"] == tokens(30)
    assert r["distinctLengths"] >= 5  # drawn while it streamed, not all at once
    assert (r["userMessages"], r["assistantMessages"]) == (1, 1)
    assert r["sendVisible"]  # the Stop button is gone once the turn is over
    assert r["activeSessionTitle"].startswith("count for me")


def test_a_message_typed_during_a_turn_steers_it(node: str, server: Proc, tmp_path: Path) -> None:
    r = drive(node, server, "steer", tmp_path)
    assert r["busyWhenTyped"]
    assert r["steer"] == ["↪ You: also check Paris fake:aside"]
    assert (r["userMessages"], r["assistantMessages"]) == (1, 1)  # no turn of its own
    session = httpx.get(f"{server.url}/api/chat/sessions/{r['sessionId']}").json()
    assistant = session["messages"][1]
    steered = [p["data"]["text"] for p in assistant["parts"] if p["type"] == "data-steer"]
    assert steered == ["also check Paris fake:aside"]
    assert assistant["status"] == "completed"


def test_stop_a_long_reply(node: str, server: Proc, tmp_path: Path) -> None:
    r = drive(node, server, "stop", tmp_path)
    assert r["badge"] == "Stopped"
    assert r["atStop"] == r["later"]  # it stopped growing
    assert r["full"].startswith(r["atStop"]) and len(r["atStop"]) < len(r["full"])
    assert len(r["atStop"].split()) >= 20
    assert r["sendVisible"] and not r["stopVisible"]
    turn = httpx.get(f"{server.url}/api/chat/sessions/{r['sessionId']}/turns/{r['turnId']}").json()
    assert turn["status"] == "cancelled"


def test_reload_mid_reply_resumes_without_duplicates(
    node: str, server: Proc, tmp_path: Path
) -> None:
    r = drive(node, server, "reload", tmp_path)
    expected = tokens(80)
    first = r["withCursor"]
    assert len(first["before"].split()) >= 15
    assert first["afterReload"] != expected  # the reload really happened mid-reply
    assert first["text"] == expected
    assert (first["userMessages"], first["assistantMessages"]) == (1, 1)
    # After the reload the page read on from its saved cursor, not from the start.
    resumed = [q for q in first["requestsAfterReload"] if q["method"] == "GET"]
    assert resumed and all(q["lastEventId"] for q in resumed)
    # A new tab has no saved cursor: it reads the active turn from its start and
    # draws the finished first turn from the stored messages.
    assert r["newTab"]["texts"] == [expected, expected]
    assert any("turn_id=" in q["url"] for q in r["newTab"]["requests"])
    assert r["firstTabTexts"] == [expected, expected]


def test_network_loss_resumes_from_the_cursor(node: str, server: Proc, tmp_path: Path) -> None:
    r = drive(node, server, "network", tmp_path)
    assert r["connText"].startswith("Reconnecting")
    assert r["text"] == tokens(80)
    assert r["resumedWithCursor"] >= 1
    assert r["connHiddenAtEnd"]


def test_failed_turn_shows_the_error_line(node: str, server: Proc, tmp_path: Path) -> None:
    r = drive(node, server, "error", tmp_path)
    assert "broke off" in r["live"]
    assert r["stored"] == r["live"]  # after a reload, from the stored turn
    assert r["badge"] == "Failed"
    assert r["text"].startswith("t0")
    assert r["sendVisible"]


def test_session_list_new_switch_delete(node: str, server: Proc, tmp_path: Path) -> None:
    r = drive(node, server, "sessions", tmp_path)
    names, ids = r["names"], r["ids"]
    assert len(set(ids)) == 3
    assert r["titlesBefore"][:3] == names[::-1]  # newest first
    for name, sid in zip(names, ids, strict=True):
        shown = r["shown"][name]
        assert shown["user"] == [name]
        assert shown["assistant"] == f"Echo: {name}"
        assert (shown["title"], shown["hashId"]) == (name, sid)
    assert r["armedText"] == "Delete?"
    assert names[0] not in r["titlesAfter"] and names[1] in r["titlesAfter"]
    assert r["hashAfterDelete"] == "#/" and r["emptyVisible"]
    assert httpx.get(f"{server.url}/api/chat/sessions/{ids[0]}").status_code == 404
    assert httpx.get(f"{server.url}/api/chat/sessions/{ids[1]}").status_code == 200


def test_tool_cards_reasoning_and_safe_markdown(node: str, server: Proc, tmp_path: Path) -> None:
    r = drive(node, server, "tools", tmp_path)
    assert r["closedByDefault"]
    weather, search = r["cards"]
    assert (weather["name"], weather["state"]) == ("get_weather", "output-available")
    assert '"city": "Paris"' in weather["body"] and '"temp_c": 21' in weather["body"]
    assert (search["name"], search["state"]) == ("search", "output-error")
    assert "search backend unavailable" in search["body"]
    assert r["reasoning"] == {"summary": "Reasoning", "body": "The user wants the weather."}
    md = r["md"]
    assert md["strong"] == ["21 °C"] and md["em"] == ["clear"]
    assert md["items"] == ["one inline", "two"] and md["inlineCode"] == "inline"
    assert md["code"] == "print('<b>hi</b>')"
    assert md["links"] == [
        {"href": "https://example.com/docs", "rel": "noopener noreferrer", "text": "docs"}
    ]
    # Model-written markup is text, never elements.
    assert md["imgs"] == 0 and md["scripts"] == 0 and r["xss"] is None
    assert '<img src=x onerror="window.__xss=1">' in md["text"]
    assert r["realReasoning"] == "r0 r1 r2 r3 r4" and r["realText"] == tokens(5)


def test_tool_approval_card_approve_reload_deny_stop(
    node: str, server: Proc, tmp_path: Path
) -> None:
    r = drive(node, server, "approval", tmp_path)
    sid = r["sessionId"]
    api = f"{server.url}/api/chat/sessions/{sid}"
    saved = json.dumps({"saved": True, "notes": 1})

    # The card asks: the tool, its input, Approve and Deny; the turn waits, Stop can end it.
    waiting = r["waiting"]
    assert (waiting["name"], waiting["state"]) == ("save_note", "approval-requested")
    assert waiting["open"] and waiting["asking"]
    assert waiting["buttons"] == ["Approve", "Deny"]
    assert '"text": "buy milk"' in waiting["body"]
    assert waiting["badge"] == "Waiting for your approval" and waiting["stopVisible"]
    assert waiting["text"] == ""

    # Approved: the page read on from the pause's cursor; the output and the reply came.
    approved = r["approved"]
    assert approved["state"] == "output-available" and not approved["asking"]
    assert '"saved": true' in approved["body"]
    assert approved["text"] == f"Tool save_note returned: {saved}"
    assert approved["badge"] == "" and approved["sendVisible"]
    resumed = [q for q in approved["resumed"] if q["method"] == "GET"]
    assert resumed and all(
        (q["lastEventId"] or "").startswith(f"{waiting['turnId']}:") for q in resumed
    )
    first = httpx.get(f"{api}/turns/{waiting['turnId']}").json()
    assert first["status"] == "completed"
    assert [a["status"] for a in first["approvals"]] == ["approved"]

    # After a reload the card asks again (from the saved snapshot and cursor)...
    reloaded = r["reloaded"]
    assert (reloaded["state"], reloaded["asking"]) == ("approval-requested", True)
    assert reloaded["buttons"] == ["Approve", "Deny"]
    assert '"text": "sell milk"' in reloaded["body"]
    after_reload = [q for q in reloaded["requests"] if q["method"] == "GET"]
    assert after_reload and all(q["lastEventId"] for q in after_reload)
    # ...and Deny: nothing ran, the card says so, the model's reply follows.
    denied = r["denied"]
    assert denied["state"] == "output-denied" and not denied["asking"]
    assert denied["stateText"] == "denied" and "Not run" in denied["body"]
    assert "The user denied this call of 'save_note'" in denied["text"]
    assert denied["badge"] == ""
    second = httpx.get(f"{api}/turns/{reloaded['turnId']}").json()
    assert second["status"] == "completed"
    assert [a["status"] for a in second["approvals"]] == ["denied"]

    # A new tab has no snapshot: the stored message draws the card, and the page
    # reads from the active turn's last frame rather than replaying the turn.
    tab = r["newTab"]
    assert (tab["state"], tab["asking"], tab["assistantMessages"]) == (
        "approval-requested",
        True,
        3,
    )
    assert '"text": "keep milk"' in tab["body"]
    gets = [q for q in tab["requests"] if q["method"] == "GET"]
    assert gets and all(q["lastEventId"] and "turn_id=" not in q["url"] for q in gets)
    # Stop while waiting ends the turn at once; the call never ran.
    stopped = r["stopped"]
    assert stopped["badge"] == "Stopped" and not stopped["asking"]
    assert stopped["state"] == "output-denied" and stopped["sendVisible"]
    assert "Not run: the turn was stopped" in stopped["body"]
    # Answered by another client: the page sees the turn go on, without a reload.
    elsewhere = r["elsewhere"]
    assert elsewhere["answerStatus"] == 200
    assert elsewhere["state"] == "output-available" and not elsewhere["asking"]
    assert (
        elsewhere["text"] == f"Tool save_note returned: {json.dumps({'saved': True, 'notes': 2})}"
    )
    session = httpx.get(api).json()
    assert session["active_turn"] is None
    assert [m["status"] for m in session["messages"] if m["role"] == "assistant"] == [
        "completed",
        "completed",
        "cancelled",
        "completed",
    ]


def test_api_keys_ask_for_the_token(node: str, keyed_server: Proc, tmp_path: Path) -> None:
    r = drive(node, keyed_server, "auth", tmp_path, token=TOKEN)
    assert r["firstReason"] == "This server needs an API token."
    assert "not accepted" in r["wrongReason"]
    assert r["text"] == r["expected"] == tokens(10)
    assert r["stored"] == TOKEN
    assert not r["promptAfterReload"] and r["textAfterReload"] == tokens(10)
    headers = {"authorization": f"Bearer {TOKEN}"}
    session = httpx.get(
        f"{keyed_server.url}/api/chat/sessions/{r['sessionId']}", headers=headers
    ).json()
    assert session["user_id"] == "alice"


def test_the_api_docs_page_renders_offline(node: str, keyed_server: Proc, tmp_path: Path) -> None:
    """`/docs` renders the served OpenAPI document with nothing from elsewhere
    (every request off the server is refused, and none is even tried)."""
    r = drive(node, keyed_server, "docs", tmp_path)
    doc = httpx.get(f"{keyed_server.url}/openapi.json").json()
    documented = [f"{m}{path}" for path, item in doc["paths"].items() for m in item]
    assert sorted(op.replace(" ", "") for op in r["operations"]) == sorted(documented)
    assert r["offServer"] == []
    assert "TransportRequest" in r["submitText"] and "429" in r["submitText"]
    assert "trigger" in r["schemaText"] and "messageId" in r["schemaText"]
    assert "regenerate-message" in r["schemaText"] and "[object" not in r["schemaText"]
