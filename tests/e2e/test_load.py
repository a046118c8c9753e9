"""Correctness under load: 120 turns submitted at once to one `turnrelay serve`,
from two users whose running slots (20 each) are fewer than their turns, so most
wait in the users' FIFOs. Every stream ends with `[DONE]` and the exact text; no
speed is asserted (bench/concurrency.py measures it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.procs import FakeLLMProc, Proc, start_serve, tokens

pytestmark = pytest.mark.slow
TURNS_PER_USER = 60
TOKENS = 30


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, llm: FakeLLMProc) -> Iterator[Proc]:
    proc = start_serve(
        tmp_path_factory.mktemp("load"),
        llm,
        {
            "TURNRELAY_API_KEYS": "tok-a=ann,tok-b=ben",
            "TURNRELAY_MAX_RUNNING_TURNS_PER_USER": "20",
            "TURNRELAY_MAX_WAITING_TURNS_PER_USER": "100",
            "TURNRELAY_MAX_STREAMS_PER_USER": "100",
            "TURNRELAY_NUM_WORKERS": "64",
        },
    )
    yield proc
    proc.stop()


async def one_turn(client: httpx.AsyncClient, marker: str) -> tuple[str, bool]:
    sid = (await client.post("/api/chat/sessions")).json()["id"]
    text, done = "", False
    async with client.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": f"{marker} fake:tokens={TOKENS} fake:delay_ms=10"},
    ) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["type"] == "text-delta":
                    text += chunk["delta"]
    return text, done


async def run_all(url: str) -> list[tuple[str, bool]]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    clients = [
        httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {tok}"}, timeout=120, limits=limits
        )
        for tok in ("tok-a", "tok-b")
    ]
    try:
        return await asyncio.gather(
            *(one_turn(c, f"load{k}") for c in clients for k in range(TURNS_PER_USER))
        )
    finally:
        for c in clients:
            await c.aclose()


def test_every_turn_of_a_burst_arrives_whole_and_exact(loaded: Proc) -> None:
    results = asyncio.run(run_all(loaded.url))
    want = tokens(TOKENS)
    assert len(results) == 2 * TURNS_PER_USER
    cut = [r for r in results if not r[1]]
    wrong = [r for r in results if r[1] and r[0] != want]
    assert cut == [] and wrong == []
