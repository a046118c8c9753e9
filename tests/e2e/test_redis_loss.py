"""Redis restarts empty under a running turn (it keeps nothing on disk here).

The cluster runs on a private redis-server that the test kills and starts again
on the same port. The turn goes on: the executor takes its lease again, its
writer restarts the turn's log at the next seq with `data-stream-reset` and a
snapshot of the message so far; a reader that was caught up rebuilds the
message from there, older cursors answer 410, and a replay from the start gives
the whole message.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import skip_or_fail
from tests.e2e.cluster import Cluster, running_cluster
from tests.procs import free_port, iter_sse, read_sse

pytestmark = pytest.mark.slow
AUTH = {"authorization": "Bearer tok-alice"}


class PrivateRedis:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, PrivateRedis]]:
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server is not installed")
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
        cursor = seen[-1][0]
        deadline = time.monotonic() + 30
        while True:  # resume with the cursor until the API answers again
            with client.stream(
                "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": cursor or ""}
            ) as r:
                if r.status_code == 410:
                    resumed = None
                    break
                if r.status_code == 200:
                    resumed = read_sse(r)
                    if resumed.done:
                        break
                    seen += resumed.events
                    cursor = resumed.events[-1][0] if resumed.events else cursor
            assert time.monotonic() < deadline
            time.sleep(0.2)
        if resumed is not None:
            # caught up at the loss: the reset arrives in-band and rebuilds the message
            assert assemble(seen + resumed.events) == expected
            assert any('"data-stream-reset"' in d for _, d in resumed.events)
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
        # a cursor from before the loss is gone
        r = client.get(f"/api/chat/sessions/{sid}/stream", params={"after": f"{turn_id}:2"})
        assert r.status_code == 410
        turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
        assert turn["status"] == "completed"
        session = client.get(f"/api/chat/sessions/{sid}").json()
        assert session["messages"][1]["content"] == expected
