"""Time from `POST …/stream` to the first `text-delta` at the client, with an
instant model: embedded (`turnrelay serve`) vs distributed (`turnrelay api` +
`turnrelay executor` over RabbitMQ, Redis, PostgreSQL), and distributed with the
executor reaching the database through `turnrelay db-manager` (db-manager).

The baseline, measured in the same run, is the fake model itself: `POST
/v1/chat/completions` to its first content chunk. Each mode runs ROUNDS
rounds of TURNS sequential turns; the report gives the median over rounds of
each round's p50 and p99.

    python bench/first_delta.py [--turns 200] [--rounds 3] [--modes embedded,distributed,db-manager]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import POSTGRES_URL  # noqa: E402
from tests.e2e.cluster import Cluster  # noqa: E402
from tests.procs import FakeLLMProc, free_port, start, start_fake_llm  # noqa: E402

AUTH = {"authorization": "Bearer tok-bench"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def first_delta_via_api(client: httpx.Client, sid: str, text: str) -> float:
    t0 = time.perf_counter()
    with client.stream("POST", f"/api/chat/sessions/{sid}/stream", json={"message": text}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {") and '"text-delta"' in line:
                elapsed = time.perf_counter() - t0
                break
        else:
            raise RuntimeError("stream ended without a text-delta")
        for _ in lines:  # drain: the next turn starts on an idle session
            pass
    return elapsed


def first_delta_direct(llm: FakeLLMProc, client: httpx.Client, text: str) -> float:
    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": text}]}
    t0 = time.perf_counter()
    with client.stream("POST", f"{llm.base_url}/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                elapsed = time.perf_counter() - t0
                break
        for _ in lines:
            pass
    return elapsed


def run_rounds(measure: Callable[[int], float], turns: int, rounds: int) -> dict[str, float]:
    p50s, p99s = [], []
    for _ in range(rounds):
        samples = [measure(i) for i in range(turns)]
        p50s.append(percentile(samples, 0.50) * 1000)
        p99s.append(percentile(samples, 0.99) * 1000)
    return {"p50_ms": statistics.median(p50s), "p99_ms": statistics.median(p99s)}


def bench_api(url: str, turns: int, rounds: int) -> dict[str, float]:
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        for _ in range(10):  # warm up connections, caches, JIT-less imports
            sid = client.post("/api/chat/sessions").json()["id"]
            first_delta_via_api(client, sid, "warm up")

        def measure(i: int) -> float:
            sid = client.post("/api/chat/sessions").json()["id"]
            return first_delta_via_api(client, sid, f"bench {i}")

        return run_rounds(measure, turns, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="embedded,distributed")
    args = parser.parse_args()
    modes = args.modes.split(",")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        llm = start_fake_llm(tmp)
        try:
            with httpx.Client(timeout=30) as direct:
                results["baseline (fake model direct)"] = run_rounds(
                    lambda i: first_delta_direct(llm, direct, f"bench {i}"), args.turns, args.rounds
                )
            common = {
                "TURNRELAY_MODEL": "openai:fake",
                "OPENAI_BASE_URL": llm.base_url,
                "OPENAI_API_KEY": "unused",
                "TURNRELAY_API_KEYS": "tok-bench=bench",
                "TURNRELAY_MAX_RUNNING_TURNS_PER_USER": "1000",
            }
            if "embedded" in modes:
                port = free_port()
                serve = start(
                    "serve",
                    ["serve", "--port", str(port)],
                    env=common,
                    tmp=tmp,
                    health_url=f"http://127.0.0.1:{port}/health",
                )
                try:
                    results["embedded (serve)"] = bench_api(
                        f"http://127.0.0.1:{port}", args.turns, args.rounds
                    )
                finally:
                    serve.stop()
            for mode, name in (
                ("distributed", "distributed (api + executor)"),
                ("db-manager", "distributed, via db-manager"),
            ):
                if mode not in modes:
                    continue
                cluster = Cluster(
                    tmp=tmp,
                    llm=llm,
                    postgres_url=POSTGRES_URL,
                    extra_env={"TURNRELAY_API_KEYS": "tok-bench=bench"},
                    mode="db-manager" if mode == "db-manager" else "direct",
                )
                cluster.create()
                try:
                    if mode == "db-manager":
                        cluster.start_db_manager()
                    api = cluster.start_api()
                    cluster.start_executor()
                    results[name] = bench_api(api.url, args.turns, args.rounds)
                finally:
                    cluster.stop()
        finally:
            llm.proc.stop()
    print(
        f"time to first text-delta, {args.turns} turns x {args.rounds} rounds "
        "(median of per-round percentiles)"
    )
    for name, r in results.items():
        print(f"  {name:32s} p50 {r['p50_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
