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
from tests.procs import FakeLLMProc, Proc, start_fake_llm, start_serve

pytestmark = [pytest.mark.node, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "chat.spec.mjs"
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "tok"
# One scenario takes a few seconds; the bound only stops a wedged browser.
DRIVER_TIMEOUT = 90.0


def tokens(n: int) -> str:
    return " ".join(f"t{i}" for i in range(n))


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
