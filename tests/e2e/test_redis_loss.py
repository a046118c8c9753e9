"""Redis restarts empty under a running turn (it keeps nothing on disk here).

The cluster runs on a private redis-server that the test kills and starts again
on the same port. The turn goes on: the executor takes its lease again, its
writer restarts the turn's log at the next seq with `data-stream-reset` and a
snapshot of the message so far; a reader that was caught up rebuilds the
message from there (never a 410 while the turn runs), an older cursor rebuilds
from the reset too, and a replay from the start gives the whole message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.cluster import Cluster, running_cluster
from tests.procs import iter_sse, read_sse
from tests.servers import PrivateRedis

pytestmark = pytest.mark.slow
AUTH = {"authorization": "Bearer tok-alice"}


@pytest.fixture
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, PrivateRedis]]:
    tmp = tmp_path_factory.mktemp("redisloss")
    redis = PrivateRedis(tmp)
    redis.start()
    try:
        with running_cluster(
            tmp, apis=1, executors=1, redis_url=redis.url, extra_env={"TURNRELAY_LEASE_TTL": "3s"}
        ) as c:
            yield c, redis
    finally:
        redis.kill()


def assemble(events: list[tuple[str | None, str]]) -> str:
    """The text a client builds, honouring `data-stream-reset`."""
    text = ""
    for _, data in events:
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if chunk["type"] == "data-stream-reset":
            text = ""
        elif chunk["type"] == "text-delta":
            text += chunk["delta"]
    return text


def resume_to_done(
    client: httpx.Client, sid: str, cursor: str | None
) -> list[tuple[str | None, str]]:
    """Resume with the cursor until ``[DONE]``. Never a 410: the turn still runs,
    and its executor restores the log (503 only while this API cannot reach
    Redis yet)."""
    events: list[tuple[str | None, str]] = []
    deadline = time.monotonic() + 30
    while True:
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": cursor or ""}
        ) as r:
            assert r.status_code in (200, 503), r.read()
            if r.status_code == 200:
                resumed = read_sse(r)
                events += resumed.events
                cursor = resumed.events[-1][0] if resumed.events else cursor
                if resumed.done:
                    return events
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_turn_survives_a_redis_restart(setup: tuple[Cluster, PrivateRedis]) -> None:
    cluster, redis = setup
    expected = " ".join(f"t{i}" for i in range(60))
    with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        turn_id = client.post(
            f"/api/chat/sessions/{sid}/turns",
            json={"message": "survive fake:tokens=60 fake:delay_ms=60"},
        ).json()["turn_id"]
        seen: list[tuple[str | None, str]] = []
        with client.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
            for ident, data in iter_sse(r):
                if data is None:
                    continue
                seen.append((ident, data))
                if len(seen) == 12:
                    redis.kill()
                    time.sleep(0.5)
                    redis.start()  # empty
            # the API ended the stream without [DONE] when Redis went away
        assert seen[-1][1] != "[DONE]"
        seen += resume_to_done(client, sid, seen[-1][0])
        # Caught up at the loss: the reset arrives in-band and rebuilds the message.
        assert any('"data-stream-reset"' in d for _, d in seen[12:])
        assert assemble(seen) == expected
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": turn_id}
        ) as r:
            whole = read_sse(r)
        assert whole.done
        kinds = [c["type"] for c in whole.chunks]
        assert kinds[:2] == ["data-stream-reset", "start"]
        assert assemble(whole.events) == expected
        seqs = [int(i.split(":")[1]) for i in whole.ids]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        # A cursor from before the loss is not in the restarted log, but the log
        # begins with a reset and a snapshot, so it rebuilds the whole message.
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", params={"after": f"{turn_id}:2"}
        ) as r:
            assert r.status_code == 200
            old = read_sse(r)
        assert old.done and old.chunks[0]["type"] == "data-stream-reset"
        assert assemble(old.events) == expected
        # A cursor beyond the log's end never existed.
        r = client.get(f"/api/chat/sessions/{sid}/stream", params={"after": f"{turn_id}:9999"})
        assert r.status_code == 410
        turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
        assert turn["status"] == "completed"
        session = client.get(f"/api/chat/sessions/{sid}").json()
        assert session["messages"][1]["content"] == expected


def test_a_reader_during_a_silent_stretch_waits_for_the_restored_log(
    setup: tuple[Cluster, PrivateRedis],
) -> None:
    """Redis is lost while the turn is silent (a long tool call, a slow model):
    nothing is appended for seconds, yet a reader resuming with its cursor gets
    no 410; it waits, and the executor's heartbeat restores the log."""
    cluster, redis = setup
    with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        client.post(
            f"/api/chat/sessions/{sid}/turns",
            json={"message": "quiet fake:tokens=3 fake:delay_ms=4000"},
        ).raise_for_status()
        seen: list[tuple[str | None, str]] = []
        with client.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
            for ident, data in iter_sse(r):
                if data is not None:
                    seen.append((ident, data))
                    if '"text-delta"' in data:
                        break  # the model now stays silent for 4 s
        redis.kill()
        redis.start()  # empty, while nothing is being written
        seen += resume_to_done(client, sid, seen[-1][0])
        assert any('"data-stream-reset"' in d for _, d in seen)
        assert assemble(seen) == "t0 t1 t2"
