"""Many users pressing Send in the same second: N turns submitted at once.

Embedded `turnrelay serve` pinned to CPU 0 (the client and the fake model share
the other core); each turn is a fresh session whose model streams TOKENS tokens
DELAY ms apart. Reported per N (median over rounds): first token p50/p99 from
the submit, the added gap between tokens p50/p99 (over the model's own
DELAY), the time until every turn is done (the ideal is TOKENS x DELAY), the
server's CPU seconds, and streams cut (no `[DONE]`, or text not exact).

The baseline, in the same run, is the fake model alone: N concurrent streams
straight to it, first chunk p50/p99 and total.

    python bench/concurrency.py [--n 50,200,500] [--rounds 3] [--tokens 100] [--delay 20]
        [--mode embedded|distributed] [--logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import POSTGRES_URL  # noqa: E402
from tests.e2e.cluster import Cluster  # noqa: E402
from tests.procs import FakeLLMProc, Proc, free_port, start, start_fake_llm  # noqa: E402
from tests.procs import tokens as token_text  # noqa: E402

AUTH = {"authorization": "Bearer tok-bench"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Turn:
    first: float | None = None
    gaps: list[float] = field(default_factory=list)
    text: str = ""
    done: bool = False
    error: str | None = None
    marks: list[str] = field(default_factory=list)  # data-turn-retry, data-stream-reset


async def one_turn(
    client: httpx.AsyncClient, sid: str, message: str, start: asyncio.Event, t0: list[float]
) -> Turn:
    turn = Turn()
    await start.wait()
    try:
        async with client.stream(
            "POST", f"/api/chat/sessions/{sid}/stream", json={"message": message}
        ) as r:
            last = None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    turn.done = True
                    break
                chunk = json.loads(data)
                if chunk.get("type") in ("data-turn-retry", "data-stream-reset"):
                    turn.marks.append(f"{chunk['type']} {chunk.get('data')}")
                if chunk.get("type") == "text-delta":
                    now = time.perf_counter()
                    if turn.first is None:
                        turn.first = now - t0[0]
                    elif last is not None:
                        turn.gaps.append(now - last)
                    last = now
                    turn.text += chunk["delta"]
    except httpx.HTTPError as exc:
        turn.error = f"{type(exc).__name__}: {exc}"
    return turn


async def direct_turn(
    client: httpx.AsyncClient, llm: FakeLLMProc, message: str, start: asyncio.Event, t0: list[float]
) -> Turn:
    turn = Turn()
    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": message}]}
    await start.wait()
    async with client.stream("POST", f"{llm.base_url}/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if turn.first is None and '"content":"' in line and '"content":""' not in line:
                turn.first = time.perf_counter() - t0[0]
            if line == "data: [DONE]":
                turn.done = True
    return turn


def cpu_seconds(pids: list[int]) -> float:
    return sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


def pin(pid: int, cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


async def round_api(url: str, pids: list[int], n: int, tokens: int, delay: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120, limits=limits) as client:
        sids = [(await client.post("/api/chat/sessions")).json()["id"] for _ in range(n)]
        start, t0 = asyncio.Event(), [0.0]
        message = f"fake:tokens={tokens} fake:delay_ms={delay}"
        tasks = [asyncio.create_task(one_turn(client, s, message, start, t0)) for s in sids]
        await asyncio.sleep(0.2)
        cpu0 = cpu_seconds(pids)
        t0[0] = time.perf_counter()
        start.set()
        turns = await asyncio.gather(*tasks)
        total = time.perf_counter() - t0[0]
        cpu1 = cpu_seconds(pids)
    want = token_text(tokens)
    firsts = [t.first for t in turns if t.first is not None]
    gaps = [g - delay / 1000 for t in turns for g in t.gaps]
    cut_turns = [t for t in turns if not t.done or t.text != want]
    cut = len(cut_turns)
    for t in cut_turns[:5]:  # why, so a cut stream can be chased
        print(
            f"  cut at N={n}: done={t.done} text {len(t.text)}/{len(want)} chars, "
            f"first token {t.first}, error {t.error}, marks {t.marks}",
            file=sys.stderr,
        )
    return {
        "first_p50": percentile(firsts, 0.5),
        "first_p99": percentile(firsts, 0.99),
        "gap_p50": percentile(gaps, 0.5),
        "gap_p99": percentile(gaps, 0.99),
        "total": total,
        "cpu": cpu1 - cpu0,
        "cut": cut,
    }


async def round_direct(llm: FakeLLMProc, n: int, tokens: int, delay: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start, t0 = asyncio.Event(), [0.0]
        message = f"fake:tokens={tokens} fake:delay_ms={delay}"
        tasks = [
            asyncio.create_task(direct_turn(client, llm, message, start, t0)) for _ in range(n)
        ]
        await asyncio.sleep(0.2)
        t0[0] = time.perf_counter()
        start.set()
        turns = await asyncio.gather(*tasks)
        total = time.perf_counter() - t0[0]
    firsts = [t.first for t in turns if t.first is not None]
    return {
        "first_p50": percentile(firsts, 0.5),
        "first_p99": percentile(firsts, 0.99),
        "total": total,
        "cut": sum(1 for t in turns if not t.done),
    }


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def start_embedded(tmp: Path, llm: FakeLLMProc, n: int) -> tuple[Proc, list[int]]:
    port = free_port()
    serve = start(
        "serve",
        ["serve", "--port", str(port)],
        env={
            "TURNRELAY_MODEL": "openai:fake",
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "unused",
            "TURNRELAY_API_KEYS": "tok-bench=bench",
            "TURNRELAY_MAX_RUNNING_TURNS_PER_USER": str(max(n, 5)),
            "TURNRELAY_MAX_STREAMS_PER_USER": str(n + 10),
            "TURNRELAY_NUM_WORKERS": str(n),
        },
        tmp=tmp,
        health_url=f"http://127.0.0.1:{port}/health",
    )
    serve.url = f"http://127.0.0.1:{port}"
    pin(serve.popen.pid, {0})
    return serve, [serve.popen.pid]


def start_distributed(tmp: Path, llm: FakeLLMProc, n: int) -> tuple[Cluster, str, list[int]]:
    cluster = Cluster(
        tmp=tmp,
        llm=llm,
        postgres_url=POSTGRES_URL,
        extra_env={
            "TURNRELAY_API_KEYS": "tok-bench=bench",
            "TURNRELAY_MAX_RUNNING_TURNS_PER_USER": str(max(n, 5)),
            "TURNRELAY_MAX_STREAMS_PER_USER": str(n + 10),
            "TURNRELAY_NUM_WORKERS": str(n),
        },
    )
    cluster.create()
    api = cluster.start_api()
    executor = cluster.start_executor()
    pids = [api.popen.pid, executor.popen.pid]
    for pid in pids:
        pin(pid, {0})
    return cluster, api.url, pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="50,200")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--delay", type=int, default=20)
    parser.add_argument("--mode", default="embedded", choices=["embedded", "distributed"])
    parser.add_argument("--logs", type=Path, help="copy the server processes' logs here")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})  # the client off the server's core
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        llm = start_fake_llm(tmp)
        pin(llm.proc.popen.pid, {1})
        try:
            for n in [int(x) for x in args.n.split(",")]:
                base = median_of(
                    [
                        asyncio.run(round_direct(llm, n, args.tokens, args.delay))
                        for _ in range(args.rounds)
                    ]
                )
                (tmp / str(n)).mkdir()
                if args.mode == "embedded":
                    serve, pids = start_embedded(tmp / str(n), llm, n)
                    url, stop = serve.url, serve.stop
                else:
                    cluster, url, pids = start_distributed(tmp / str(n), llm, n)
                    stop = cluster.stop
                try:
                    asyncio.run(round_api(url, pids, 5, args.tokens, args.delay))  # warm up
                    got = median_of(
                        [
                            asyncio.run(round_api(url, pids, n, args.tokens, args.delay))
                            for _ in range(args.rounds)
                        ]
                    )
                finally:
                    stop()
                    if args.logs:
                        args.logs.mkdir(parents=True, exist_ok=True)
                        for log in (tmp / str(n)).glob("*.log"):
                            shutil.copy(log, args.logs / f"{n}-{log.name}")
                rows.append((n, base, got))
        finally:
            llm.proc.stop()
    ideal = args.tokens * args.delay / 1000
    print(
        f"{args.mode}: N turns at once, {args.tokens} tokens x {args.delay} ms "
        f"(ideal {ideal:.1f} s), median of {args.rounds} rounds"
    )
    print(
        "   N | first p50 / p99 (s) | model alone p50 / p99 | gap+ p50 / p99 (ms) "
        "| total (s) | cpu (s) | cut"
    )
    for n, base, got in rows:
        print(
            f"{n:4d} | {got['first_p50']:8.3f} / {got['first_p99']:6.3f} "
            f"| {base['first_p50']:8.3f} / {base['first_p99']:6.3f} "
            f"| {got['gap_p50'] * 1000:7.1f} / {got['gap_p99'] * 1000:7.1f} "
            f"| {got['total']:7.2f} | {got['cpu']:6.2f} | {got['cut']:.0f}"
        )
    print(json.dumps([{"n": n, "baseline": b, "turnrelay": g} for n, b, g in rows]))


if __name__ == "__main__":
    main()
