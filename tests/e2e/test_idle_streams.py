"""1,000 idle streams held by one `turnrelay serve`, then their turns finish:
every stream gets its turn's whole, exact text and `[DONE]`.

The streams are idle for as long as the test wants, not for a guessed delay:
the fake model is stopped (SIGSTOP) before the turns start, so each turn runs,
logs its `start` frame and waits on a model that does not answer. 50 users
(the per-user cap is 20 streams per API process) each run one turn read by 20
streams. Once the server counts all 1,000 streams open, the model is continued
(SIGCONT). No speed is asserted (bench/idle_streams.py measures memory).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.procs import FakeLLMProc, Proc, start_fake_llm, start_serve, tokens

pytestmark = pytest.mark.slow
USERS = 50
STREAMS_PER_USER = 20  # TURNRELAY_MAX_STREAMS_PER_USER's default
TOKENS = 20
SETTLE = 120.0  # the longest any step may take before the test gives up


@pytest.fixture(scope="module")
def stopped_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLLMProc]:
    """A fake model of this test's own: it is stopped and continued."""
    llm = start_fake_llm(tmp_path_factory.mktemp("idle-llm"))
    yield llm
    os.kill(llm.proc.popen.pid, signal.SIGCONT)
    llm.proc.stop()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, stopped_llm: FakeLLMProc) -> Iterator[Proc]:
    proc = start_serve(
        tmp_path_factory.mktemp("idle"),
        stopped_llm,
        {
            "TURNRELAY_API_KEYS": ",".join(f"tok-{u}=idle-{u}" for u in range(USERS)),
            "TURNRELAY_NUM_WORKERS": str(USERS),
            "TURNRELAY_HEARTBEAT_INTERVAL": "5",
        },
    )
    yield proc
    proc.stop()


@dataclass
class Stream:
    text: str = ""
    done: bool = False
    status: int = 0


async def read_stream(
    client: httpx.AsyncClient, sid: str, held: asyncio.Semaphore, stream: Stream
) -> None:
    """Read the session's active turn; release ``held`` at its first frame."""
    first = True
    async with client.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
        stream.status = r.status_code
        if r.status_code != 200:
            held.release()
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if first:
                first = False
                held.release()
            if line == "data: [DONE]":
                stream.done = True
                break
            chunk = json.loads(line[6:])
            if chunk["type"] == "text-delta":
                stream.text += chunk["delta"]


async def wait_running(client: httpx.AsyncClient, sid: str, turn_id: str) -> None:
    async with asyncio.timeout(SETTLE):
        while True:
            turn = (await client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}")).json()
            if turn["status"] == "running":
                return
            await asyncio.sleep(0.1)


async def server_open_streams(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    match = re.search(r"^turnrelay_open_streams (\S+)$", text, re.M)
    assert match is not None, text
    return float(match.group(1))


async def scenario(url: str, llm_pid: int) -> list[Stream]:
    limits = httpx.Limits(max_connections=STREAMS_PER_USER + 5)
    clients = [
        httpx.AsyncClient(
            base_url=url,
            headers={"authorization": f"Bearer tok-{u}"},
            timeout=SETTLE,
            limits=limits,
        )
        for u in range(USERS)
    ]
    try:
        sids, turn_ids = [], []
        for u, client in enumerate(clients):
            sid = (await client.post("/api/chat/sessions")).json()["id"]
            r = await client.post(
                f"/api/chat/sessions/{sid}/turns",
                json={"message": f"idle{u} fake:tokens={TOKENS}"},
            )
            assert r.status_code == 202, r.text
            sids.append(sid)
            turn_ids.append(r.json()["turn_id"])
        running = zip(clients, sids, turn_ids, strict=True)
        await asyncio.gather(*(wait_running(c, s, t) for c, s, t in running))

        held = asyncio.Semaphore(0)
        streams = [Stream() for _ in range(USERS * STREAMS_PER_USER)]
        tasks = [
            asyncio.create_task(
                read_stream(clients[k // STREAMS_PER_USER], sids[k // STREAMS_PER_USER], held, s)
            )
            for k, s in enumerate(streams)
        ]
        async with asyncio.timeout(SETTLE):
            for _ in streams:
                await held.acquire()
        # Every stream is open and has its turn's first frame; no turn has text yet.
        assert [s.status for s in streams] == [200] * len(streams)
        assert await server_open_streams(clients[0]) == len(streams)
        assert all(s.text == "" and not s.done for s in streams)

        os.kill(llm_pid, signal.SIGCONT)
        async with asyncio.timeout(SETTLE):
            await asyncio.gather(*tasks)
        return streams
    finally:
        for c in clients:
            await c.aclose()


def test_a_thousand_idle_streams_each_get_the_whole_answer(
    serve: Proc, stopped_llm: FakeLLMProc
) -> None:
    llm_pid = stopped_llm.proc.popen.pid
    os.kill(llm_pid, signal.SIGSTOP)
    try:
        streams = asyncio.run(scenario(serve.url, llm_pid))
    finally:
        os.kill(llm_pid, signal.SIGCONT)
    want = tokens(TOKENS)
    assert len(streams) == USERS * STREAMS_PER_USER
    assert [s for s in streams if not s.done] == []
    assert [s.text for s in streams if s.text != want] == []
