"""Distributed mode with real processes: `turnrelay api` + two `turnrelay executor`
+ `turnrelay fake-llm --record`, over RabbitMQ, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import POSTGRES_URL
from tests.e2e.cluster import MODES, Cluster, running_cluster
from tests.procs import FakeLLMProc, iter_sse, read_sse
from turnrelay.queue.base import TurnMessage
from turnrelay.queue.rabbitmq import RabbitTurnQueue

pytestmark = pytest.mark.slow
AUTH = {"authorization": "Bearer tok-alice"}


@pytest.fixture(scope="module", params=MODES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    # One user streams fifty turns at once from one API below.
    env = {"TURNRELAY_MAX_STREAMS_PER_USER": "100"}
    with running_cluster(
        tmp_path_factory.mktemp("cluster"), apis=2, executors=2, extra_env=env, mode=request.param
    ) as c:
        yield c


def model_requests(llm: FakeLLMProc, marker: str) -> list[dict[str, Any]]:
    return [
        r for r in llm.requests() if marker in json.dumps((r.get("body") or {}).get("messages", []))
    ]


def last_user(request: dict[str, Any]) -> str:
    users = [m for m in (request.get("body") or {}).get("messages", []) if m["role"] == "user"]
    return str(users[-1]["content"]) if users else ""


def conversation(request: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in request["body"]["messages"] if m["role"] != "system"]


async def _stream_turn(client: httpx.AsyncClient, sid: str, text: str) -> str:
    async with client.stream(
        "POST", f"/api/chat/sessions/{sid}/stream", json={"message": text}
    ) as r:
        assert r.status_code == 200, await r.aread()
        body = ""
        async for chunk in r.aiter_text():
            body += chunk
    assert body.rstrip().endswith("data: [DONE]")
    deltas = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["type"] == "text-delta":
                    deltas.append(chunk["delta"])
    return "".join(deltas)


def test_fifty_turns_over_25_sessions(cluster: Cluster) -> None:
    api = cluster.apis[0]
    before = [cluster.finished_turns(e) for e in cluster.executors]

    async def run() -> tuple[list[str], list[tuple[str, str, str]]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(
            base_url=api.url, headers=AUTH, timeout=120, limits=limits
        ) as client:
            sids = [(await client.post("/api/chat/sessions")).json()["id"] for _ in range(25)]
            jobs = [
                (sid, f"fan s{i} m{j} fake:delay_ms=15")
                for i, sid in enumerate(sids)
                for j in range(2)
            ]
            replies = await asyncio.gather(*(_stream_turn(client, s, t) for s, t in jobs))
            return sids, [(s, t, r) for (s, t), r in zip(jobs, replies, strict=True)]

    sids, results = asyncio.run(run())
    for _, text, reply in results:
        assert reply == "Echo: " + text.split(" fake:")[0]
    after = [cluster.finished_turns(e) for e in cluster.executors]
    ran = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(ran) == 50 and all(n > 0 for n in ran), ran  # both executors ran turns

    records = cluster.llm.records()
    closed = {r["request_index"]: r["t"] for r in records if r.get("event") == "closed"}
    with httpx.Client(base_url=api.url, headers=AUTH) as client:
        for i, sid in enumerate(sids):
            session = client.get(f"/api/chat/sessions/{sid}").json()
            users = [m["content"] for m in session["messages"] if m["role"] == "user"]
            reqs = model_requests(cluster.llm, f"fan s{i} m")
            assert len(reqs) == 2
            # no two turns of one session in flight at once
            first, second = sorted(reqs, key=lambda r: r["t"])
            assert closed[first["request_index"]] <= second["t"]
            # every turn's history held exactly the earlier turns
            assert conversation(first) == [("user", users[0])]
            assert conversation(second) == [
                ("user", users[0]),
                ("assistant", "Echo: " + users[0].split(" fake:")[0]),
                ("user", users[1]),
            ]


def deliveries(cluster: Cluster, outcome: str) -> float:
    """Turn messages the cluster's executors settled with ``outcome`` so far."""
    total = 0.0
    for ex in cluster.executors:
        text = httpx.get(f"{ex.url}/metrics", timeout=5).text
        total += sum(
            float(m)
            for m in re.findall(
                rf'^turnrelay_deliveries_total\{{outcome="{outcome}"\}} ([0-9.e+]+)$', text, re.M
            )
        )
    return total


def wait_for_deliveries(cluster: Cluster, outcome: str, count: float) -> None:
    deadline = time.monotonic() + 30
    while deliveries(cluster, outcome) < count:
        assert time.monotonic() < deadline, f"{outcome} deliveries never reached {count}"
        time.sleep(0.1)


def test_duplicate_delivery_runs_once(cluster: Cluster) -> None:
    """Copies of a turn's message — while it waits behind another turn of its
    session, while it runs, after it ended — never run it twice or out of order."""
    api = cluster.apis[0]

    async def publish(turn_id: str, sid: str, copies: int) -> None:
        queue = RabbitTurnQueue(cluster.amqp_url, name=cluster.namespace)
        await queue.startup()
        try:
            for _ in range(copies):
                await queue.publish(TurnMessage(turn_id, sid))
        finally:
            await queue.shutdown()

    with httpx.Client(base_url=api.url, headers=AUTH, timeout=60) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        first = client.post(
            f"/api/chat/sessions/{sid}/turns",
            json={"message": "dupe first fake:tokens=30 fake:delay_ms=30"},
        ).json()["turn_id"]
        second = client.post(
            f"/api/chat/sessions/{sid}/turns", json={"message": "dupe second fake:tokens=5"}
        ).json()["turn_id"]
        ended_before = deliveries(cluster, "ended")
        streamed: list[tuple[str | None, str]] = []
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": first}
        ) as s:
            for ident, data in iter_sse(s):
                if data is None:
                    continue
                streamed.append((ident, data))
                if len(streamed) == 3:  # the first turn runs now
                    asyncio.run(publish(first, sid, 2))  # copies while it runs
                    asyncio.run(publish(second, sid, 1))  # a copy of the queued one, early
        assert streamed[-1][1] == "[DONE]"
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": second}
        ) as s:
            sse = read_sse(s)
        assert sse.done and sse.text() == " ".join(f"t{i}" for i in range(5))
        asyncio.run(publish(first, sid, 1))  # and one after both ended
        # 2 + 1 copies of the first and one of the second end up dropped as "ended"
        # (the second's own message or its early copy, whichever came second)
        wait_for_deliveries(cluster, "ended", ended_before + 4)
        for turn_id in (first, second):
            turn = client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}").json()
            assert turn["status"] == "completed" and turn["attempt"] == 1
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": first}
        ) as s:
            again = read_sse(s)
        assert again.events == streamed  # nothing appended by a second run
        session = client.get(f"/api/chat/sessions/{sid}").json()
        assert [m["content"] for m in session["messages"]][1::2] == [
            " ".join(f"t{i}" for i in range(30)),
            " ".join(f"t{i}" for i in range(5)),
        ]
    asked = [last_user(r) for r in cluster.llm.requests()]
    asked = [text for text in asked if text.startswith("dupe")]
    # each ran once, the second only after the first: per-session order held
    assert asked == ["dupe first fake:tokens=30 fake:delay_ms=30", "dupe second fake:tokens=5"]


def test_resume_on_another_api_replica(cluster: Cluster) -> None:
    one, two = cluster.apis[0], cluster.apis[1]
    with (
        httpx.Client(base_url=one.url, headers=AUTH, timeout=60) as c1,
        httpx.Client(base_url=two.url, headers=AUTH, timeout=60) as c2,
    ):
        sid = c1.post("/api/chat/sessions").json()["id"]
        with c1.stream(
            "POST",
            f"/api/chat/sessions/{sid}/stream",
            json={"message": "replica fake:tokens=40 fake:delay_ms=25"},
        ) as r:
            half = read_sse(r, stop_after=15)
        turn_id = half.ids[0].split(":")[0]
        with c2.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": half.ids[-1]}
        ) as r:
            rest = read_sse(r)
        with c2.stream("GET", f"/api/chat/sessions/{sid}/stream", params={"turn_id": turn_id}) as r:
            whole = read_sse(r)
    assert rest.done and whole.done
    assert half.events + rest.events == whole.events
    assert whole.text() == " ".join(f"t{i}" for i in range(40))


def test_api_and_executor_refuse_embedded_backends(cluster: Cluster) -> None:
    import subprocess
    import sys

    for role in ("api", "executor"):
        r = subprocess.run(
            [sys.executable, "-m", "turnrelay.cli", role],
            env={"PATH": "/usr/bin:/bin", "TURNRELAY_MODEL": "openai:fake"},
            capture_output=True,
            text=True,
            timeout=30,
            cwd=cluster.tmp,
        )
        assert r.returncode == 2
        assert "memory://" in r.stderr and "SQLite" in r.stderr and "Traceback" not in r.stderr


def test_api_refuses_an_out_of_date_schema(cluster: Cluster) -> None:
    import subprocess
    import sys

    async def create_empty() -> None:
        import asyncpg

        conn = await asyncpg.connect(
            POSTGRES_URL.replace("+asyncpg", "").rsplit("/", 1)[0] + "/postgres"
        )
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{cluster.db_name}_empty"')
            await conn.execute(f'CREATE DATABASE "{cluster.db_name}_empty"')
        finally:
            await conn.close()

    asyncio.run(create_empty())
    env = {
        **cluster.env(),
        "PATH": "/usr/bin:/bin",
        "TURNRELAY_DATABASE_URL": cluster.database_url + "_empty",
    }
    r = subprocess.run(
        [sys.executable, "-m", "turnrelay.cli", "api"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cluster.tmp,
    )
    assert r.returncode == 2 and "turnrelay migrate" in r.stderr, r.stderr
