"""The `claude` runtime's stored transcript when a turn does not simply finish:
an executor killed -9 mid-turn, a cancelled turn, a stored transcript that is
missing or corrupt, a transcript the CLI refuses. Real processes: the bundled CLI,
the fake LLM, executors over RabbitMQ, Redis and PostgreSQL, storage on disk."""

from __future__ import annotations

import itertools
import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.test_failover import running_on
from tests.e2e.transcripts import (
    TOOL,
    StoredTranscripts,
    blocks,
    claude_cluster,
    client,
    conversation,
    new_session,
    request_with,
    requests_with,
    start_executor,
    storage_env,
    texts,
    turn,
)
from tests.procs import iter_sse

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    storage = storage_env("local", request, tmp_path)
    with claude_cluster(
        tmp_path, storage, TURNRELAY_LEASE_TTL="2s", TURNRELAY_REQUEUE_DELAY="300ms"
    ) as c:
        yield c


def _turn_status(http: httpx.Client, sid: str, turn_id: str, status: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        found: dict[str, object] = http.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
        if found["status"] == status:
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


def _stream_until(http: httpx.Client, sid: str, kind: str, count: int) -> None:
    """Follow the running turn's stream until ``count`` chunks of ``kind`` arrived."""
    seen = 0
    with http.stream("GET", f"/api/chat/sessions/{sid}/stream") as s:
        for _, data in iter_sse(s):
            if data and data != "[DONE]" and json.loads(data)["type"] == kind:
                seen += 1
                if seen == count:
                    return
    raise AssertionError(f"the stream ended after {seen} {kind} chunks")


def _cancel_at(http: httpx.Client, sid: str, message: str, kind: str, count: int) -> None:
    """Run a turn of ``message``, cancel it once ``count`` chunks of ``kind`` streamed."""
    r = http.post(f"/api/chat/sessions/{sid}/turns", json={"message": message})
    _stream_until(http, sid, kind, count)
    assert http.post(f"/api/chat/sessions/{sid}/cancel").json()["cancelled"]
    _turn_status(http, sid, r.json()["turn_id"], "cancelled")


@pytest.mark.parametrize("disk", ["own", "shared"])
def test_a_retry_after_kill_9_resumes_the_last_completed_turn(cluster: Cluster, disk: str) -> None:
    """``shared``: both executors use one sandbox directory (two executors on one
    host), so the retry finds the dead attempt's half in the CLI's file on disk too."""
    marker = uuid.uuid4().hex[:8]
    sandbox = cluster.tmp / "sandbox" if disk == "shared" else None
    start_executor(cluster, "a", sandbox)
    start_executor(cluster, "b", sandbox)
    with client(cluster) as http:
        sid = new_session(http)
        stored = StoredTranscripts(cluster.tmp / "objects", "alice", sid)
        first = turn(http, sid, f"compute {marker} {TOOL}").text()
        # Turn 2 calls a tool, then answers slowly: killed while it answers, the dead
        # attempt has mirrored its user message, tool call and tool result.
        second = f"more {marker}-2 {TOOL} fake:delay_ms=700"
        r = http.post(f"/api/chat/sessions/{sid}/turns", json={"message": second})
        turn_id = r.json()["turn_id"]
        _stream_until(http, sid, "tool-output-available", 1)
        deadline = time.monotonic() + 20
        dead_half = "/l/00000002-0001/"  # turn 2, attempt 1
        while not any(b"tool_result" in stored.get(k) for k in stored.listed() if dead_half in k):
            assert time.monotonic() < deadline, stored.listed()
            time.sleep(0.05)
        victim = running_on(cluster)
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(5)
        killed_at = len(cluster.llm.requests())
        if sandbox is not None:  # the half is on the disk the retry will use
            (on_disk,) = sandbox.glob("*/.claude/projects/*/*.jsonl")
            assert f"more {marker}-2" in on_disk.read_text()
        done = _turn_status(http, sid, turn_id, "completed")
        assert done["attempt"] == 2
        turn(http, sid, f"last {marker}-3")

    records = cluster.llm.requests()
    dead = [r["body"] for r in records[:killed_at] if f"{marker}-2" in json.dumps(r["body"])]
    assert dead[-1]["messages"][-1]["content"][0]["type"] == "tool_result"  # was answering
    # The retry's first model call: the first request after the kill (the dead
    # attempt's CLI was streaming its last answer, so it has no call left to make;
    # under bubblewrap it died with its executor anyway).
    retry = records[killed_at]["body"]
    messages = conversation(retry)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    (use,) = [b for m in messages for b in blocks(m) if b["type"] == "tool_use"]  # turn 1's
    assert use["id"] in json.dumps(messages[1])
    assert texts(messages[3]) == [first]
    # Turn 2's message once, as the last message: nothing of the dead attempt.
    assert json.dumps(messages).count(f"{marker}-2") == 1
    assert f"{marker}-2" in json.dumps(messages[-1])
    # And the retry's transcript is what the next turn continues: turn 2 once.
    later = conversation(request_with(cluster, f"{marker}-3"))
    assert json.dumps(later).count(f"more {marker}-2") == 1
    assert [m["role"] for m in later] == ["user", "assistant", "user", "assistant"] * 2 + ["user"]


def test_a_cancelled_turn_keeps_the_partial_answer(cluster: Cluster) -> None:
    marker = uuid.uuid4().hex[:8]
    start_executor(cluster, "a")
    with client(cluster) as http:
        sid = new_session(http)
        turn(http, sid, f"compute {marker} {TOOL}")
        _cancel_at(http, sid, f"long {marker}-2 fake:tokens=400 fake:delay_ms=50", "text-delta", 10)
        partial = http.get(f"/api/chat/sessions/{sid}").json()["messages"][-1]
        assert partial["status"] == "cancelled"
        turn(http, sid, f"after {marker}-3")

    messages = conversation(request_with(cluster, f"{marker}-3"))
    (asked,) = [i for i, m in enumerate(messages) if f"long {marker}-2" in json.dumps(m)]
    said = " ".join(texts(messages[asked + 1]))
    # What the database kept is what the model sees (the CLI may have had a token
    # more than the executor streamed when the cancel came), and only part of it.
    assert partial["content"].startswith("t0 t1 t2") and said.startswith(partial["content"])
    assert messages[asked + 1]["role"] == "assistant" and "t399" not in said
    assert f"after {marker}-3" in json.dumps(messages[-1])


# A stored transcript the runtime can tell is unusable (not JSON lines); one it
# cannot tell, which the CLI refuses ("No conversation found"); and none at all.
UNUSABLE = b"\x00\xff not a transcript\n{broken json\n"
REFUSED = b'{"type":"user","uuid":"x"}\n{"type":"assistant","uuid":"y","parentUuid":"x"}\n'
LOGGED = {
    "missing": "no stored transcript for CLI session",
    "unusable": "is unusable (no user message)",
    "refused": "the CLI refused to resume",
}


@pytest.mark.parametrize("case", list(LOGGED))
def test_a_lost_transcript_falls_back_to_the_database_history(cluster: Cluster, case: str) -> None:
    marker = uuid.uuid4().hex[:8]
    executor, _ = start_executor(cluster, "a")
    with client(cluster) as http:
        sid = new_session(http)
        first = turn(http, sid, f"compute {marker} {TOOL}").text()
        stored = StoredTranscripts(cluster.tmp / "objects", "alice", sid)
        key = stored.compacted()
        bad = {"missing": None, "unusable": UNUSABLE, "refused": REFUSED}[case]
        if bad is None:
            stored.delete(key)
        else:
            stored.put(key, bad)
        assert turn(http, sid, f"after {marker}-2").text() == f"Echo: after {marker}-2"
        turn(http, sid, f"then {marker}-3")

    # One model call (a refused resume fails before any), in a fresh CLI session
    # whose system prompt carries turn 1 from the database.
    body, _ = requests_with(cluster, f"{marker}-2")  # (then turn 3's)
    system = json.dumps(body["system"])
    assert f"compute {marker}" in system and json.dumps(first)[1:-1] in system
    assert [m["role"] for m in conversation(body)] == ["user"]
    assert LOGGED[case] in executor.log()
    quarantined = stored.listed("q")
    if bad is None:
        assert quarantined == []
    else:  # kept for inspection under q/, as it was
        (q,) = quarantined
        assert q.startswith(key.rsplit("/c/", 1)[0] + "/q/") and stored.get(q) == bad
    (now,) = stored.listed("c")
    assert now.rsplit("/", 3)[-3] != key.rsplit("/", 3)[-3]  # another CLI session
    # Turn 3 resumes that new session: turn 2 as messages, turn 1 still in view.
    later = request_with(cluster, f"{marker}-3")
    assert [m["role"] for m in conversation(later)] == ["user", "assistant", "user"]
    assert f"compute {marker}" in json.dumps(later["system"])


@pytest.mark.parametrize("at", ["tool-input-start", "tool-input-available"])
def test_a_turn_cancelled_in_a_tool_call_leaves_every_call_answered(
    cluster: Cluster, at: str
) -> None:
    """Cancelled while the model streams a tool call, or once it is called: the next
    request must still be one a real API accepts, each ``tool_use`` answered by a
    ``tool_result`` in the message after it."""
    marker = uuid.uuid4().hex[:8]
    start_executor(cluster, "a")
    with client(cluster) as http:
        sid = new_session(http)
        turn(http, sid, f"hello {marker}")
        _cancel_at(http, sid, f"tool {marker}-2 {TOOL} fake:delay_ms=800", at, 1)
        assert turn(http, sid, f"after {marker}-3").text() == f"Echo: after {marker}-3"

    messages = conversation(request_with(cluster, f"{marker}-3"))
    assert f"tool {marker}-2" in json.dumps(messages)
    roles = [m["role"] for m in messages]
    assert all(a != b for a, b in itertools.pairwise(roles)), roles  # alternating
    for i, message in enumerate(messages):
        calls = {b["id"] for b in blocks(message) if b["type"] == "tool_use"}
        if calls:
            answered = {
                b["tool_use_id"] for b in blocks(messages[i + 1]) if b["type"] == "tool_result"
            }
            assert calls <= answered, (calls, messages[i + 1])
    if at == "tool-input-available":  # the call was made: it is in the transcript
        assert any(b["type"] == "tool_use" for m in messages for b in blocks(m))


def test_a_frozen_attempt_that_wakes_up_never_replaces_the_retrys_transcript(
    cluster: Cluster,
) -> None:
    """The executor of turn 1 is frozen (SIGSTOP) in its tool call; the turn is
    retried and completes elsewhere; then the frozen one wakes up (SIGCONT) and
    ends its attempt, storing what its CLI wrote. Turn 2 must resume the retry's
    transcript (the tool call the database shows), not the stale attempt's."""
    marker = uuid.uuid4().hex[:8]
    start_executor(cluster, "a")
    start_executor(cluster, "b")
    with client(cluster) as http:
        sid = new_session(http)
        stored = StoredTranscripts(cluster.tmp / "objects", "alice", sid)
        r = http.post(
            f"/api/chat/sessions/{sid}/turns",
            json={"message": f"compute {marker} {TOOL} fake:delay_ms=400"},
        )
        _stream_until(http, sid, "tool-input-start", 1)
        frozen = running_on(cluster)
        frozen.popen.send_signal(signal.SIGSTOP)
        try:
            _turn_status(http, sid, r.json()["turn_id"], "completed")
        finally:
            frozen.popen.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30  # the woken attempt stores its transcript
        while not any(k.endswith("/c/00000001-0001.jsonl") for k in stored.listed()):
            assert time.monotonic() < deadline, stored.listed()
            time.sleep(0.1)
        time.sleep(1)  # and records its CLI session, if it does
        answer = http.get(f"/api/chat/sessions/{sid}").json()["messages"][1]
        (part,) = [p for p in answer["parts"] if p["type"] == "tool-calculate"]
        turn(http, sid, f"then {marker}-2")

    messages = conversation(request_with(cluster, f"{marker}-2"))
    (use,) = [b for m in messages for b in blocks(m) if b["type"] == "tool_use"]
    assert use["id"] == part["toolCallId"], (use["id"], part["toolCallId"])
