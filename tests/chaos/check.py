"""What every chaos scenario checks: the client's view, the database, the model.

``watch`` reads a turn the way a browser does under faults: from its first frame,
dropping the connection where told and resuming each time on the *next* API
replica with its cursor, retrying while a replica or a backend is down.
``verify`` then holds the run to the contract:

* the frames the client got, across every reconnect, are exactly one
  uninterrupted replay of the turn's log (same ids, same data, nothing missing,
  nothing repeated);
* after the last ``data-turn-retry`` only the new attempt's parts appear (fresh
  ids), and the text they assemble is the expected answer;
* the database holds one terminal state and the same answer;
* the fake model was called exactly as often as the attempts that really ran.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.e2e.cluster import Cluster
from tests.procs import iter_sse

AUTH = {"authorization": "Bearer tok-alice"}
WATCH_TIMEOUT = 90.0


@dataclass
class Watched:
    sid: str
    turn_id: str
    events: list[tuple[str, str]] = field(default_factory=list)  # (id, data), [DONE] not kept
    reconnects: int = 0
    refused: list[int] = field(default_factory=list)  # statuses answered while resuming

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(d) for _, d in self.events]


def answer(tokens: int) -> str:
    """What the fake model answers to ``fake:tokens=N``."""
    return " ".join(f"t{i}" for i in range(tokens))


def start_turn(api: str, text: str) -> tuple[str, str]:
    with httpx.Client(base_url=api, headers=AUTH, timeout=30) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        r = client.post(f"/api/chat/sessions/{sid}/turns", json={"message": text})
        assert r.status_code == 202, r.text
        return sid, r.json()["turn_id"]


def watch(
    apis: list[str],
    sid: str,
    turn_id: str,
    *,
    disconnects: int = 0,
    rng: random.Random | None = None,
    first_api: int = 0,
    cursor: str | None = None,
) -> Watched:
    """Read the turn to its ``[DONE]`` (from ``cursor``, or its first frame),
    breaking the connection ``disconnects`` times after a random few frames,
    each time resuming on the next replica. Any answer but 200, or 502/503 while
    something restarts, fails."""
    rng = rng or random.Random(0)
    watched = Watched(sid, turn_id)
    replica = first_api
    deadline = time.monotonic() + WATCH_TIMEOUT
    while time.monotonic() < deadline:
        base = apis[replica % len(apis)]
        replica += 1
        headers = dict(AUTH)
        params: dict[str, str] = {}
        if cursor is None:
            params["turn_id"] = turn_id
        else:
            headers["last-event-id"] = cursor
        drop_after = rng.randint(1, 6) if watched.reconnects < disconnects else None
        try:
            with httpx.stream(
                "GET",
                f"{base}/api/chat/sessions/{sid}/stream",
                headers=headers,
                params=params,
                timeout=httpx.Timeout(30, connect=2),
            ) as r:
                if r.status_code != 200:
                    r.read()
                    watched.refused.append(r.status_code)
                    assert r.status_code in (502, 503), (r.status_code, r.text)
                    time.sleep(0.2)
                    continue
                got = 0
                for ident, data in iter_sse(r):
                    if data is None:
                        continue
                    if data == "[DONE]":
                        return watched
                    assert ident is not None
                    watched.events.append((ident, data))
                    cursor = ident
                    got += 1
                    if drop_after is not None and got >= drop_after:
                        break
        except httpx.TransportError:
            time.sleep(0.2)  # a replica is down or restarting: the next one
        watched.reconnects += 1
    raise AssertionError(f"turn {turn_id} never reached [DONE] ({len(watched.events)} frames)")


def read_until(
    api: str,
    sid: str,
    turn_id: str,
    count: int,
    on_count,  # type: ignore[no-untyped-def]
) -> list[tuple[str, str]]:
    """Read the turn from its first frame; after ``count`` frames call
    ``on_count()`` (the fault) and go on until the stream ends, by ``[DONE]``
    or because the fault broke it."""
    seen: list[tuple[str, str]] = []
    try:
        with httpx.stream(
            "GET",
            f"{api}/api/chat/sessions/{sid}/stream",
            headers=AUTH,
            params={"turn_id": turn_id},
            timeout=30,
        ) as r:
            for ident, data in iter_sse(r):
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                seen.append((ident or "", data))
                if len(seen) == count:
                    on_count()
    except httpx.TransportError:
        pass
    return seen


def rebuilt_text(chunks: list[dict[str, Any]]) -> str:
    """The answer a client builds, honouring `data-stream-reset` and retries."""
    text = ""
    for chunk in chunks:
        if chunk["type"] in ("data-stream-reset", "data-turn-retry"):
            text = ""
        elif chunk["type"] == "text-delta":
            text += chunk["delta"]
    return text


def replay(api: str, sid: str, turn_id: str) -> list[tuple[str, str]]:
    with httpx.stream(
        "GET",
        f"{api}/api/chat/sessions/{sid}/stream",
        headers=AUTH,
        params={"turn_id": turn_id},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        events = [(i or "", d) for i, d in iter_sse(r) if d is not None]
    assert events[-1][1] == "[DONE]"
    return events[:-1]


def final_attempt(chunks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], set[str]]:
    """The chunks after the last ``data-turn-retry``, and the part ids before it."""
    cut = max((i for i, c in enumerate(chunks) if c["type"] == "data-turn-retry"), default=-1)
    before = {c["id"] for c in chunks[: cut + 1] if "id" in c and c["type"].endswith("-start")}
    return chunks[cut + 1 :], before


def model_calls(cluster: Cluster, text: str) -> int:
    """Requests the fake model got whose last user message is ``text``."""
    count = 0
    for record in cluster.llm.requests():
        users = [m for m in (record.get("body") or {}).get("messages", []) if m["role"] == "user"]
        if users and users[-1]["content"] == text:
            count += 1
    return count


def verify(
    cluster: Cluster,
    watched: Watched,
    *,
    text: str,
    expected: str,
    attempts: int | None = None,
    calls: int | None = None,
    status: str = "completed",
) -> None:
    api = cluster.apis[0].url if cluster.apis else ""
    log = replay(api, watched.sid, watched.turn_id)
    assert watched.events == log, "the client's frames differ from one replay of the log"
    seqs = [int(i.rsplit(":", 1)[1]) for i, _ in log]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the log has a gap"
    chunks = watched.chunks
    assert chunks[-1]["type"] == "finish"
    last, before = final_attempt(chunks)
    fresh = {c["id"] for c in last if "id" in c and c["type"].endswith("-start")}
    assert not fresh & before, "the final attempt reused a part of an earlier one"
    streamed = "".join(c["delta"] for c in last if c["type"] == "text-delta")
    if status == "completed":
        assert streamed == expected
    with httpx.Client(base_url=api, headers=AUTH, timeout=30) as client:
        turn = client.get(f"/api/chat/sessions/{watched.sid}/turns/{watched.turn_id}").json()
        session = client.get(f"/api/chat/sessions/{watched.sid}").json()
    assert turn["status"] == status, turn
    if attempts is not None:
        assert turn["attempt"] == attempts, turn
    assert session["active_turn"] is None
    assistant = next(
        m
        for m in session["messages"]
        if m["turn_id"] == watched.turn_id and m["role"] == "assistant"
    )
    assert assistant["content"] == streamed
    if calls is not None:
        assert model_calls(cluster, text) == calls
