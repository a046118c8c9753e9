"""Webhooks on turn end against real processes and a real receiver that
verifies every signature with the Standard Webhooks reference library."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.e2e.cluster import Cluster, running_cluster
from tests.procs import FakeLLMProc, Proc, start_serve

SECRET = "whsec_" + base64.b64encode(b"webhook-test-secret-32-bytes-long").decode()
AUTH = {"authorization": "Bearer tok-alice"}


@dataclass
class Receiver:
    """Answers each delivery with ``answer(attempt number)``; keeps what came."""

    answer: Callable[[int], int] = lambda n: 200
    seen: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def wait(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            assert time.monotonic() < deadline, f"{len(self.seen)} of {count} deliveries came"
            time.sleep(0.05)
        return self.seen


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    verifier = Webhook(SECRET)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                verifier.verify(body, headers)
                verified = True
            except Exception:
                verified = False
            state.seen.append(
                {
                    "id": headers.get("webhook-id"),
                    "verified": verified,
                    "body": json.loads(body),
                    "t": time.time(),
                }
            )
            self.send_response(state.answer(len(state.seen)))
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/turns"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    proc = start_serve(
        tmp_path_factory.mktemp("hooks"),
        llm,
        {
            "TURNRELAY_API_KEYS": "tok-alice=alice",
            "TURNRELAY_WEBHOOK_SECRET": SECRET,
            "TURNRELAY_WEBHOOK_ALLOW_PRIVATE": "true",
            "TURNRELAY_WEBHOOK_RETRY_BASE": "200ms",
        },
    )
    yield proc
    proc.stop()


def submit(client: httpx.Client, text: str, **body: Any) -> tuple[str, str]:
    sid = client.post("/api/chat/sessions").json()["id"]
    r = client.post(f"/api/chat/sessions/{sid}/turns", json={"message": text, **body})
    assert r.status_code == 202, r.text
    return sid, r.json()["turn_id"]


def turn_status(client: httpx.Client, sid: str, turn_id: str) -> dict[str, Any]:
    return dict(client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json())


def wait_running(client: httpx.Client, sid: str, turn_id: str) -> None:
    deadline = time.monotonic() + 10
    while turn_status(client, sid, turn_id)["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def wait_delivered(client: httpx.Client, sid: str, turn_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        status = turn_status(client, sid, turn_id)
        if status["webhooks"] and status["webhooks"][0]["status"] != "pending":
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_signed_delivery_retried_until_the_receiver_takes_it(
    hooked: Proc, receiver: Receiver
) -> None:
    receiver.answer = lambda n: 500 if n <= 2 else 204  # fails the first two
    with httpx.Client(base_url=hooked.url, headers=AUTH, timeout=30) as client:
        sid, turn_id = submit(client, "hook me", webhook_url=receiver.url)
        seen = receiver.wait(3)
        status = wait_delivered(client, sid, turn_id)
    assert [s["verified"] for s in seen] == [True, True, True]
    assert len({s["id"] for s in seen}) == 1  # one webhook-id on every retry
    body = seen[-1]["body"]
    assert body["type"] == "turn.completed"
    assert body["data"]["turn_id"] == turn_id and body["data"]["session_id"] == sid
    assert body["data"]["status"] == "completed" and body["data"]["text"] == "Echo: hook me"
    assert "usage" in body["data"]
    # the retries backed off (200 ms, then 400 ms)
    assert seen[1]["t"] - seen[0]["t"] >= 0.15 and seen[2]["t"] - seen[1]["t"] >= 0.3
    # the turn did not wait for its webhook
    assert status["status"] == "completed"
    log = status["webhooks"]
    assert len(log) == 1
    assert (log[0]["status"], log[0]["attempts"], log[0]["last_status"]) == ("delivered", 3, 204)
    assert log[0]["event"] == "turn.completed" and log[0]["delivered_at"]
    assert log[0]["url"] == receiver.url


def test_a_cancelled_turn_is_announced(hooked: Proc, receiver: Receiver) -> None:
    with httpx.Client(base_url=hooked.url, headers=AUTH, timeout=30) as client:
        sid, turn_id = submit(
            client, "long fake:tokens=400 fake:delay_ms=20", webhook_url=receiver.url
        )
        wait_running(client, sid, turn_id)
        assert client.post(f"/api/chat/sessions/{sid}/cancel").json()["cancelled"]
        seen = receiver.wait(1)
    assert seen[0]["verified"] and seen[0]["body"]["type"] == "turn.cancelled"


def test_bad_targets_are_refused_at_submit(
    hooked: Proc, server: Proc, tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc
) -> None:
    with httpx.Client(base_url=hooked.url, headers=AUTH, timeout=30) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        for url, code in [
            ("ftp://example.com/x", "bad_webhook"),
            ("not a url", "bad_webhook"),
            ("http://user:pw@example.com/", "bad_webhook"),
            ("http://example.com/" + "x" * 2100, "bad_webhook"),
        ]:
            r = client.post(
                f"/api/chat/sessions/{sid}/turns", json={"message": "m", "webhook_url": url}
            )
            assert (r.status_code, r.json()["code"]) == (422, code), (url, r.text)
        r = client.post(f"/api/chat/sessions/{sid}/turns", json={"message": "m", "webhook_url": 5})
        assert r.status_code == 400
        assert client.get(f"/api/chat/sessions/{sid}").json()["messages"] == []  # none persisted
    # the shared `serve` has no webhook secret: webhooks are off there
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        r = client.post(
            f"/api/chat/sessions/{sid}/turns",
            json={"message": "m", "webhook_url": "https://example.com/h"},
        )
        assert (r.status_code, r.json()["code"]) == (422, "webhooks_disabled")
    # without WEBHOOK_ALLOW_PRIVATE, loopback and private targets are refused
    strict = start_serve(
        tmp_path_factory.mktemp("strict-hooks"),
        llm,
        {"TURNRELAY_API_KEYS": "tok-alice=alice", "TURNRELAY_WEBHOOK_SECRET": SECRET},
    )
    try:
        with httpx.Client(base_url=strict.url, headers=AUTH, timeout=30) as client:
            sid = client.post("/api/chat/sessions").json()["id"]
            for url in (
                "http://127.0.0.1:9/h",
                "http://localhost/h",
                "http://10.1.2.3/h",
                "http://[::1]/h",
                "http://169.254.169.254/latest/meta-data",
            ):
                r = client.post(
                    f"/api/chat/sessions/{sid}/turns", json={"message": "m", "webhook_url": url}
                )
                assert (r.status_code, r.json()["code"]) == (422, "webhook_target_refused"), url
    finally:
        strict.stop()


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {
        "TURNRELAY_WEBHOOK_SECRET": SECRET,
        "TURNRELAY_WEBHOOK_ALLOW_PRIVATE": "true",
        "TURNRELAY_WEBHOOK_RETRY_BASE": "300ms",
        "TURNRELAY_LEASE_TTL": "2s",
        "TURNRELAY_REQUEUE_DELAY": "300ms",
    }
    with running_cluster(
        tmp_path_factory.mktemp("hook-cluster"),
        apis=1,
        executors=0,
        extra_env=env,
        mode="db-manager",
    ) as c:
        yield c


@pytest.mark.slow
def test_deliveries_survive_executor_kills(cluster: Cluster, receiver: Receiver) -> None:
    """Killed mid-turn: the retried attempt's end is announced. Killed while
    its delivery is failing: the next executor goes on with the retries."""
    receiver.answer = lambda n: 503
    first = cluster.start_executor()
    api = cluster.apis[0]
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=30) as client:
        sid, turn_id = submit(
            client, "survive fake:tokens=60 fake:delay_ms=25", webhook_url=receiver.url
        )
        wait_running(client, sid, turn_id)
        first.kill()  # mid-turn
        second = cluster.start_executor()
        receiver.wait(2)  # attempt 2 ran to the end; its delivery is failing
        assert turn_status(client, sid, turn_id)["attempt"] == 2
        second.kill()  # mid-retries
        receiver.answer = lambda n: 200
        cluster.start_executor()
        status = wait_delivered(client, sid, turn_id)
    seen = receiver.seen
    assert all(s["verified"] for s in seen) and len({s["id"] for s in seen}) == 1
    assert seen[-1]["body"]["type"] == "turn.completed"
    assert seen[-1]["body"]["data"]["text"].startswith("t0 t1")
    log = status["webhooks"]
    assert len(log) == 1 and log[0]["status"] == "delivered"
    assert log[0]["attempts"] == len(seen) >= 3
