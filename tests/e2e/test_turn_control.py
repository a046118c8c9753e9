"""Turn control across processes: idempotent submit, multitask, cancel, caps and
delete, with two API replicas and two executors over RabbitMQ, Redis, PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import MODES, Cluster, running_cluster
from tests.procs import read_sse

pytestmark = pytest.mark.slow
AUTH = {"authorization": "Bearer tok-alice"}
LONG = "fake:tokens=400 fake:delay_ms=20"


@pytest.fixture(scope="module", params=MODES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    caps = {
        "TURNRELAY_MAX_RUNNING_TURNS_PER_USER": "3",
        "TURNRELAY_MAX_QUEUED_TURNS_PER_SESSION": "2",
        "TURNRELAY_MAX_WAITING_TURNS_PER_USER": "2",
    }
    with running_cluster(
        tmp_path_factory.mktemp("control"), apis=2, executors=2, extra_env=caps, mode=request.param
    ) as c:
        yield c


@pytest.fixture
def clients(cluster: Cluster) -> Iterator[list[httpx.Client]]:
    pair = [httpx.Client(base_url=a.url, headers=AUTH, timeout=60) for a in cluster.apis]
    yield pair
    for c in pair:
        c.close()


def requests_with(cluster: Cluster, marker: str) -> list[dict[str, Any]]:
    return [
        r
        for r in cluster.llm.requests()
        if marker in json.dumps((r.get("body") or {}).get("messages", [])[-1:])
    ]


def closed_event(cluster: Cluster, request: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for r in cluster.llm.records():
            if r.get("event") == "closed" and r["request_index"] == request["request_index"]:
                return r
        assert time.monotonic() < deadline, "the model stream was never closed"
        time.sleep(0.05)


def wait_running(client: httpx.Client, sid: str, turn_id: str) -> None:
    deadline = time.monotonic() + 15
    while client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def wait_idle(client: httpx.Client, sid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        session = client.get(f"/api/chat/sessions/{sid}").json()
        if session["active_turn"] is None:
            return dict(session)
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_fifty_cancels_across_replicas(cluster: Cluster, clients: list[httpx.Client]) -> None:
    rng = random.Random(7)
    latencies = []
    for i in range(50):
        submit, cancel = rng.choice(clients), rng.choice(clients)
        sid = submit.post("/api/chat/sessions").json()["id"]
        marker = f"cx{i}x"
        turn_id = submit.post(
            f"/api/chat/sessions/{sid}/turns", json={"message": f"{marker} {LONG}"}
        ).json()["turn_id"]
        with submit.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
            head = read_sse(r, stop_after=4)  # the model is streaming now
        t0 = time.perf_counter()
        answer = cancel.post(f"/api/chat/sessions/{sid}/cancel")
        latencies.append((time.perf_counter() - t0) * 1000)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"cancelled": True, "turn_id": turn_id}
        with cancel.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": head.ids[-1]}
        ) as r:
            tail = read_sse(r)
        assert [c["type"] for c in tail.chunks][-2:] == ["abort", "finish"] and tail.done
        session = cancel.get(f"/api/chat/sessions/{sid}").json()
        assistant = session["messages"][1]
        assert assistant["status"] == "cancelled"
        assert assistant["content"] == (head.text() + tail.text())  # partial answer kept
        assert session["active_turn"] is None
        (request,) = requests_with(cluster, marker)
        assert closed_event(cluster, request)["completed"] is False
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"\ncancel to confirmed stop over 50 turns: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    for ex in cluster.executors:
        assert httpx.get(f"{ex.url}/health").json()["active_turns"] == 0


def test_queued_turn_cancelled_without_running(
    cluster: Cluster, clients: list[httpx.Client]
) -> None:
    one, two = clients
    sid = one.post("/api/chat/sessions").json()["id"]
    first = one.post(
        f"/api/chat/sessions/{sid}/turns",
        json={"message": "qfirst fake:tokens=60 fake:delay_ms=20"},
    ).json()
    queued = one.post(
        f"/api/chat/sessions/{sid}/turns", json={"message": "qsecond never runs"}
    ).json()
    wait_running(one, sid, first["turn_id"])
    # cancel the queued turn behind the running head by its id: it never runs
    answer = two.post(f"/api/chat/sessions/{sid}/cancel", json={"turn_id": queued["turn_id"]})
    assert answer.json() == {"cancelled": True, "turn_id": queued["turn_id"]}
    with one.stream(
        "GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": queued["turn_id"]}
    ) as r:
        sse = read_sse(r)
    assert [c["type"] for c in sse.chunks][-2:] == ["abort", "finish"]
    # the head was not touched by it; now cancel the head
    assert one.get(f"/api/chat/sessions/{sid}/turns/{first['turn_id']}").json()["status"] == (
        "running"
    )
    assert two.post(f"/api/chat/sessions/{sid}/cancel").json()["turn_id"] == first["turn_id"]
    wait_idle(one, sid)
    turn = one.get(f"/api/chat/sessions/{sid}/turns/{queued['turn_id']}").json()
    assert (turn["status"], turn["attempt"]) == ("cancelled", 0)
    assert requests_with(cluster, "qsecond") == []
    # cancelling it again, or a turn of another session, or a bad body
    again = two.post(f"/api/chat/sessions/{sid}/cancel", json={"turn_id": queued["turn_id"]})
    assert again.json() == {
        "cancelled": False,
        "turn_id": queued["turn_id"],
        "reason": "not_active",
    }
    other = one.post("/api/chat/sessions").json()["id"]
    r = two.post(f"/api/chat/sessions/{other}/cancel", json={"turn_id": queued["turn_id"]})
    assert r.status_code == 404
    r = two.post(f"/api/chat/sessions/{sid}/cancel", json={"turn_id": 5})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_body")
    r = two.post(f"/api/chat/sessions/{sid}/cancel", json={"turn": "x"})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_body")


def test_reject_answers_409_with_the_active_turn(
    cluster: Cluster, clients: list[httpx.Client]
) -> None:
    one, two = clients
    sid = one.post("/api/chat/sessions").json()["id"]
    active = one.post(f"/api/chat/sessions/{sid}/turns", json={"message": f"rj1 {LONG}"}).json()[
        "turn_id"
    ]
    r = two.post(
        f"/api/chat/sessions/{sid}/turns", json={"message": "rj2 rejected", "multitask": "reject"}
    )
    assert r.status_code == 409
    assert r.json()["code"] == "turn_active" and r.json()["turn_id"] == active
    assert len(one.get(f"/api/chat/sessions/{sid}").json()["messages"]) == 2
    one.post(f"/api/chat/sessions/{sid}/cancel")
    wait_idle(one, sid)
    assert requests_with(cluster, "rj2") == []


def test_interrupt_cancels_the_running_turn_and_runs_the_new_one(
    cluster: Cluster, clients: list[httpx.Client]
) -> None:
    one, two = clients
    sid = one.post("/api/chat/sessions").json()["id"]
    old = one.post(f"/api/chat/sessions/{sid}/turns", json={"message": f"int1 {LONG}"}).json()[
        "turn_id"
    ]
    with one.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
        read_sse(r, stop_after=5)
    with two.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "int2 now", "multitask": "interrupt"},
    ) as r:
        new = read_sse(r)
    assert new.done and new.text() == "Echo: int2 now"
    session = wait_idle(one, sid)
    statuses = [(m["role"], m["status"]) for m in session["messages"]]
    assert statuses == [
        ("user", "cancelled"),
        ("assistant", "cancelled"),
        ("user", "completed"),
        ("assistant", "completed"),
    ]
    partial = session["messages"][1]["content"]
    assert partial.startswith("t0 t1") and len(partial) < len(" ".join(f"t{i}" for i in range(400)))
    (first_req,) = requests_with(cluster, "int1")
    assert closed_event(cluster, first_req)["completed"] is False
    (second_req,) = requests_with(cluster, "int2")
    history = [
        (m["role"], m["content"]) for m in second_req["body"]["messages"] if m["role"] != "system"
    ]
    assert history == [("user", f"int1 {LONG}"), ("assistant", partial), ("user", "int2 now")]
    assert one.get(f"/api/chat/sessions/{sid}/turns/{old}").json()["status"] == "cancelled"


def test_racing_interrupts_on_two_replicas(cluster: Cluster, clients: list[httpx.Client]) -> None:
    sid = clients[0].post("/api/chat/sessions").json()["id"]
    clients[0].post(f"/api/chat/sessions/{sid}/turns", json={"message": f"ri0 {LONG}"})
    wait_idle_or_running = time.monotonic() + 10
    while not requests_with(cluster, "ri0"):
        assert time.monotonic() < wait_idle_or_running
        time.sleep(0.02)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda k: clients[k].post(
                    f"/api/chat/sessions/{sid}/turns",
                    json={"message": f"ri{k + 1} go", "multitask": "interrupt"},
                ),
                [0, 1],
            )
        )
    assert [a.status_code for a in answers] == [202, 202]
    session = wait_idle(clients[0], sid)
    assistant = [m for m in session["messages"] if m["role"] == "assistant"]
    assert assistant[0]["status"] == "cancelled"
    assert assistant[-1]["status"] == "completed"  # the last word wins
    # no two turns of the session were ever in flight together
    reqs = sorted(
        (r for k in range(3) for r in requests_with(cluster, f"ri{k} ")), key=lambda r: r["t"]
    )
    for earlier, later in itertools.pairwise(reqs):
        assert closed_event(cluster, earlier)["t"] <= later["t"]


def test_same_message_id_racing_on_two_replicas(
    cluster: Cluster, clients: list[httpx.Client]
) -> None:
    sid = clients[0].post("/api/chat/sessions").json()["id"]
    mid = str(uuid.uuid4())
    body = {"message": "idem race fake:delay_ms=10", "message_id": mid}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda c: c.post(f"/api/chat/sessions/{sid}/turns", json=body), clients)
        )
    assert [a.status_code for a in answers] == [202, 202]
    assert answers[0].json()["turn_id"] == answers[1].json()["turn_id"]
    # and the same id with another message: 409
    r = clients[1].post(
        f"/api/chat/sessions/{sid}/turns", json={"message": "other", "message_id": mid}
    )
    assert r.status_code == 409 and r.json()["code"] == "message_id_conflict"
    session = wait_idle(clients[0], sid)
    assert len(session["messages"]) == 2
    assert len(requests_with(cluster, "idem race")) == 1


def turn_of(client: httpx.Client, sid: str, turn_id: str) -> dict[str, Any]:
    return dict(client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json())


def test_beyond_the_running_cap_turns_wait_in_the_users_fifo(
    cluster: Cluster, clients: list[httpx.Client]
) -> None:
    one, two = clients
    sids = [one.post("/api/chat/sessions").json()["id"] for _ in range(6)]
    submitted = []
    for k, sid in enumerate(sids[:5]):  # three running (the cap), then two waiting
        client = clients[k % 2]  # the FIFO spans API replicas
        r = client.post(f"/api/chat/sessions/{sid}/turns", json={"message": f"cap{k} {LONG}"})
        assert r.status_code == 202
        submitted.append(r.json())
    assert [t["queue_position"] for t in submitted] == [None, None, None, 1, 2]
    for sid, t in zip(sids[:3], submitted[:3], strict=True):
        wait_running(one, sid, t["turn_id"])
    pending = list(zip(sids[3:5], submitted[3:], strict=True))
    waiting = [turn_of(two, sid, t["turn_id"]) for sid, t in pending]
    assert [(t["status"], t["queue_position"]) for t in waiting] == [("queued", 1), ("queued", 2)]
    assert one.get(f"/api/chat/sessions/{sids[4]}").json()["active_turn"]["queue_position"] == 2
    # Beyond the waiting cap: 429 with Retry-After, and nothing persisted.
    r = one.post(f"/api/chat/sessions/{sids[5]}/turns", json={"message": "cap over"})
    assert r.status_code == 429 and r.json()["code"] == "too_many_waiting"
    assert int(r.headers["retry-after"]) >= 1
    assert one.get(f"/api/chat/sessions/{sids[5]}").json()["messages"] == []
    # Another user's turn is not held up by alice's backlog.
    with httpx.Client(
        base_url=cluster.apis[1].url, headers={"authorization": "Bearer tok-bob"}, timeout=30
    ) as bob:
        bob_sid = bob.post("/api/chat/sessions").json()["id"]
        r = bob.post(f"/api/chat/sessions/{bob_sid}/turns", json={"message": "bob fake:tokens=3"})
        assert r.status_code == 202 and r.json()["queue_position"] is None
        bob_turn = r.json()["turn_id"]
        deadline = time.monotonic() + 20
        while turn_of(bob, bob_sid, bob_turn)["status"] != "completed":
            assert time.monotonic() < deadline, "bob's turn waited behind alice's"
            time.sleep(0.05)
    assert [turn_of(one, sid, t["turn_id"])["status"] for sid, t in pending] == ["queued"] * 2
    # A freed slot goes to the oldest waiting turn; the next moves up.
    assert one.post(f"/api/chat/sessions/{sids[1]}/cancel").status_code == 200
    wait_running(two, sids[3], submitted[3]["turn_id"])
    assert turn_of(one, sids[4], submitted[4]["turn_id"])["queue_position"] == 1
    # Deleting a session with a running turn frees its slot too.
    assert one.delete(f"/api/chat/sessions/{sids[0]}").status_code == 204
    wait_running(two, sids[4], submitted[4]["turn_id"])
    for sid in (sids[2], sids[3], sids[4]):
        one.delete(f"/api/chat/sessions/{sid}")


def test_waiting_turns_start_in_order_as_running_ones_finish(
    cluster: Cluster, clients: list[httpx.Client]
) -> None:
    one = clients[0]
    sids = [one.post("/api/chat/sessions").json()["id"] for _ in range(6)]
    ids = []
    for k, sid in enumerate(sids):
        # The running three end 0.24 s apart, so the waiting ones are admitted
        # 0.24 s apart (their start times then order them whichever executor
        # takes each); a waiting one runs long enough not to free a slot first.
        tokens = 4 * (k + 1) if k < 3 else 20
        r = one.post(
            f"/api/chat/sessions/{sid}/turns",
            json={"message": f"fifo{k} fake:tokens={tokens} fake:delay_ms=60"},
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["turn_id"])
        if len(ids) == 5:
            # The waiting cap is 2 (3 running): wait for a slot before the sixth.
            wait_running(one, sids[3], ids[3])
    turns_ = []
    for sid, tid in zip(sids, ids, strict=True):
        wait_idle(one, sid)
        turns_.append(turn_of(one, sid, tid))
    assert all(t["status"] == "completed" for t in turns_)
    started = [t["started_at"] for t in turns_]
    assert started[3:] == sorted(started[3:])  # the waiting ones in FIFO order
    finished_first = sorted(t["finished_at"] for t in turns_[:3])
    # Each waiting turn started only after a running slot freed.
    assert started[3] >= finished_first[0]
    for sid in sids:
        one.delete(f"/api/chat/sessions/{sid}")


def test_the_per_session_queue_cap_answers_429_and_persists_nothing(
    cluster: Cluster, clients: list[httpx.Client]
) -> None:
    one = clients[0]
    sid = one.post("/api/chat/sessions").json()["id"]
    r = one.post(f"/api/chat/sessions/{sid}/turns", json={"message": f"cap {LONG}"})
    assert r.status_code == 202
    wait_running(one, sid, r.json()["turn_id"])  # running turns do not count as queued
    for k in range(2):  # two queued behind the running one: the per-session cap
        assert (
            one.post(f"/api/chat/sessions/{sid}/turns", json={"message": f"queued {k}"}).status_code
            == 202
        )
    r = one.post(f"/api/chat/sessions/{sid}/turns", json={"message": "queued over"})
    assert r.status_code == 429 and "queued turns" in r.json()["detail"]
    assert r.headers["retry-after"]
    assert len(one.get(f"/api/chat/sessions/{sid}").json()["messages"]) == 6
    one.delete(f"/api/chat/sessions/{sid}")


def test_delete_cancels_the_running_turn_first(
    cluster: Cluster, clients: list[httpx.Client]
) -> None:
    one, two = clients
    sid = one.post("/api/chat/sessions").json()["id"]
    one.post(f"/api/chat/sessions/{sid}/turns", json={"message": f"del1 {LONG}"})
    with one.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
        read_sse(r, stop_after=4)
    assert two.delete(f"/api/chat/sessions/{sid}").status_code == 204
    assert one.get(f"/api/chat/sessions/{sid}").status_code == 404
    (request,) = requests_with(cluster, "del1")
    assert closed_event(cluster, request)["completed"] is False
    time.sleep(0.5)
    for ex in cluster.executors:
        assert httpx.get(f"{ex.url}/health").json()["active_turns"] == 0
