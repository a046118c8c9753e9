"""The db-manager killed (-9) and restarted while 20 turns run: executors that
reach the database only through it ride out the outage, and every turn
completes exactly once (checked in the database, on the stream and on the
fake LLM's recorded requests)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from tests.e2e.cluster import Cluster, running_cluster
from tests.e2e.test_distributed import _stream_turn

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
AUTH = {"authorization": "Bearer tok-alice"}
WORDS = " ".join(f"w{k}" for k in range(12))


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("dbm-kill"), apis=1, executors=2, mode="db-manager"
    ) as c:
        yield c


def test_a_killed_db_manager_loses_and_repeats_nothing(cluster: Cluster) -> None:
    api = cluster.apis[0]
    assert cluster.db_manager is not None
    jobs = [(i, j, f"dbm s{i} m{j} {WORDS} fake:delay_ms=40") for i in range(10) for j in range(2)]

    async def outage() -> None:
        await asyncio.sleep(0.6)  # turns are mid-stream, checkpointing
        assert cluster.db_manager is not None
        cluster.db_manager.kill()  # SIGKILL: nothing is flushed, no goodbye
        await asyncio.sleep(1.5)
        await asyncio.to_thread(cluster.start_db_manager)

    async def run() -> list[str]:
        async with httpx.AsyncClient(
            base_url=api.url, headers=AUTH, timeout=120, limits=httpx.Limits(max_connections=50)
        ) as client:
            sids = [(await client.post("/api/chat/sessions")).json()["id"] for _ in range(10)]

            async def session(i: int) -> list[str]:
                return [await _stream_turn(client, sids[i], text) for _, j, text in jobs if _ == i]

            results = await asyncio.gather(outage(), *(session(i) for i in range(10)))
            return [reply for replies in results[1:] for reply in replies]  # type: ignore[union-attr]

    replies = asyncio.run(run())
    expected = ["Echo: " + text.split(" fake:")[0] for _, _, text in jobs]
    assert replies == expected  # every stream whole, in session order

    # the database: every turn completed once, its answer whole
    async def rows() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(cluster.database_url.replace("+asyncpg", ""))
        try:
            return list(
                await conn.fetch(
                    "SELECT t.status, t.attempt, m.content FROM turns t "
                    "JOIN messages m ON m.id = t.assistant_message_id ORDER BY m.content"
                )
            )
        finally:
            await conn.close()

    found = asyncio.run(rows())
    assert len(found) == 20
    assert {r["status"] for r in found} == {"completed"}
    assert sorted(r["content"] for r in found) == sorted(expected)
    assert {r["attempt"] for r in found} == {1}  # none ran twice

    # the model: one request per turn, none repeated
    asked = Counter()
    for request in cluster.llm.requests():
        messages = (request.get("body") or {}).get("messages", [])
        last = json.dumps(messages[-1:])
        for i, j, _ in jobs:
            if f"dbm s{i} m{j} " in last:
                asked[(i, j)] += 1
    assert asked == Counter({(i, j): 1 for i, j, _ in jobs})
    # the outage really happened under the turns: executors' calls were refused
    # and retried, and the new db-manager served them
    logs = "".join(ex.log() for ex in cluster.executors)
    assert "db-manager POST /rpc/" in logs and "retrying" in logs
    assert "Traceback" not in logs
    assert cluster.db_manager.popen.poll() is None
