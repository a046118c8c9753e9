"""Executors that stop or die mid-turn (real processes, real RabbitMQ/Redis/PostgreSQL)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.cluster import MODES, Cluster, running_cluster
from tests.procs import Proc, iter_sse, read_sse

pytestmark = pytest.mark.slow
AUTH = {"authorization": "Bearer tok-alice"}


@pytest.fixture(params=MODES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    env = {"TURNRELAY_LEASE_TTL": "2s", "TURNRELAY_REQUEUE_DELAY": "300ms"}
    with running_cluster(
        tmp_path_factory.mktemp("failover"), apis=1, executors=0, extra_env=env, mode=request.param
    ) as c:
        yield c


def running_on(cluster: Cluster) -> Proc:
    """The executor whose /health reports an active turn."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for ex in cluster.executors:
            if ex.popen.poll() is None and httpx.get(f"{ex.url}/health").json()["active_turns"]:
                return ex
        time.sleep(0.05)
    raise AssertionError("no executor picked up the turn")


def start_turn(client: httpx.Client, text: str) -> tuple[str, str]:
    sid = client.post("/api/chat/sessions").json()["id"]
    r = client.post(f"/api/chat/sessions/{sid}/turns", json={"message": text})
    assert r.status_code == 202
    return sid, r.json()["turn_id"]


def test_killed_executor_turn_is_retried_elsewhere(cluster: Cluster) -> None:
    cluster.start_executor()
    cluster.start_executor()
    with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as client:
        sid, turn_id = start_turn(client, "crash fake:tokens=30 fake:delay_ms=60")
        with client.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
            before = read_sse(r, stop_after=6)
        victim = running_on(cluster)
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(5)
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": before.ids[-1]}
        ) as r:
            after = read_sse(r)
        assert after.done
        chunks = before.chunks + after.chunks
        retry = [c for c in chunks if c["type"] == "data-turn-retry"]
        assert retry == [{"type": "data-turn-retry", "data": {"attempt": 2}, "transient": True}]
        assert chunks[-1]["type"] == "finish"
        seqs = [int(i.split(":")[1]) for i in before.ids + after.ids]
        assert seqs == list(range(1, len(seqs) + 1))  # the retry continued the sequence
        # the new attempt's parts got fresh ids
        text_ids = {c["id"] for c in chunks if c["type"] == "text-start"}
        assert len(text_ids) == 2
        turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
        assert turn["status"] == "completed" and turn["attempt"] == 2
        session = client.get(f"/api/chat/sessions/{sid}").json()
        assert session["messages"][1]["content"] == " ".join(f"t{i}" for i in range(30))


def test_sigterm_lets_the_running_turn_finish(cluster: Cluster) -> None:
    ex = cluster.start_executor()
    with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as client:
        sid, turn_id = start_turn(client, "drain fake:tokens=20 fake:delay_ms=50")
        running_on(cluster)
        ex.popen.send_signal(signal.SIGTERM)
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": turn_id}
        ) as r:
            sse = read_sse(r)
        assert ex.popen.wait(20) == 0
        assert sse.done and sse.text() == " ".join(f"t{i}" for i in range(20))
        turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
        assert turn["status"] == "completed" and turn["attempt"] == 1


def test_sigterm_past_grace_hands_the_turn_to_another_executor(cluster: Cluster) -> None:
    ex = cluster.start_executor(TURNRELAY_SHUTDOWN_GRACE="300ms")
    with httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as client:
        sid, turn_id = start_turn(client, "handoff fake:tokens=40 fake:delay_ms=50")
        running_on(cluster)
        ex.popen.send_signal(signal.SIGTERM)
        assert ex.popen.wait(20) == 0
        cluster.start_executor()
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": turn_id}
        ) as r:
            sse = read_sse(r)
        assert sse.done and sse.chunks[-1]["type"] == "finish"
        turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
        assert turn["status"] == "completed" and turn["attempt"] == 2


def test_sigterm_on_the_api_ends_streams_for_resume(cluster: Cluster) -> None:
    cluster.start_executor()
    second = cluster.start_api()
    with (
        httpx.Client(base_url=second.url, headers=AUTH, timeout=60) as c2,
        httpx.Client(base_url=cluster.apis[0].url, headers=AUTH, timeout=60) as c1,
    ):
        sid, turn_id = start_turn(c2, "apiterm fake:tokens=40 fake:delay_ms=40")
        seen: list[tuple[str | None, str]] = []
        with c2.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
            for ident, data in iter_sse(r):
                if data is None:
                    continue
                seen.append((ident, data))
                if len(seen) == 5:
                    second.popen.send_signal(signal.SIGTERM)
            # the stream ended (without [DONE]) well before the turn did
        assert seen[-1][1] != "[DONE]"
        assert second.popen.wait(10) == 0
        with c1.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": seen[-1][0] or ""}
        ) as r:
            rest = read_sse(r)
        with c1.stream("GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": turn_id}) as r:
            whole = read_sse(r)
        assert seen + rest.events == whole.events
