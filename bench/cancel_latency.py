"""Time from `POST …/cancel` to its answer (`cancelled: true`, i.e. the turn's
terminal frame is logged) while the model streams: embedded (`turnrelay serve`)
vs distributed (two `api` replicas, two `executor`s, cancels sent to a random
replica). The baseline, measured in the same run, is `GET /health` on the same
API process: the HTTP round trip every cancel pays anyway.

    python bench/cancel_latency.py [--turns 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.cluster import running_cluster
from tests.procs import read_sse, start_fake_llm, start_serve

from bench.first_delta import percentile

AUTH = {"authorization": "Bearer tok-alice"}


def cancels(urls: list[str], turns: int, rounds: int) -> dict[str, float]:
    rng = random.Random(1)
    clients = [httpx.Client(base_url=u, headers=AUTH, timeout=30) for u in urls]
    p50s, p99s, base = [], [], []
    try:
        for _ in range(rounds):
            samples = []
            for _ in range(turns):
                c = rng.choice(clients)
                sid = c.post("/api/chat/sessions").json()["id"]
                c.post(
                    f"/api/chat/sessions/{sid}/turns",
                    json={"message": "fake:tokens=400 fake:delay_ms=20"},
                )
                with c.stream("GET", f"/api/chat/sessions/{sid}/stream") as r:
                    read_sse(r, stop_after=4)
                t0 = time.perf_counter()
                h = rng.choice(clients).get("/health")
                base.append((time.perf_counter() - t0) * 1000)
                assert h.status_code == 200
                t0 = time.perf_counter()
                answer = rng.choice(clients).post(f"/api/chat/sessions/{sid}/cancel").json()
                samples.append((time.perf_counter() - t0) * 1000)
                assert answer["cancelled"], answer
            p50s.append(percentile(samples, 0.5))
            p99s.append(percentile(samples, 0.99))
    finally:
        for c in clients:
            c.close()
    return {
        "p50_ms": statistics.median(p50s),
        "p99_ms": statistics.median(p99s),
        "health_p50_ms": statistics.median(base),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        llm = start_fake_llm(tmp)
        serve = start_serve(
            tmp,
            llm,
            {
                "TURNRELAY_API_KEYS": "tok-alice=alice",
                "TURNRELAY_MAX_RUNNING_TURNS_PER_USER": "1000",
            },
        )
        try:
            results["embedded (serve)"] = cancels([serve.url], args.turns, args.rounds)
        finally:
            serve.stop()
            llm.proc.stop()
        env = {"TURNRELAY_MAX_RUNNING_TURNS_PER_USER": "1000"}
        with running_cluster(
            tmp / "cluster" if (tmp / "cluster").mkdir() is None else tmp,
            apis=2,
            executors=2,
            extra_env=env,
        ) as cluster:
            results["distributed (2 api, 2 executors)"] = cancels(
                [a.url for a in cluster.apis], args.turns, args.rounds
            )
    print(
        f"cancel to confirmed stop, {args.turns} turns x {args.rounds} rounds "
        "(median of per-round percentiles)"
    )
    for k, r in results.items():
        print(
            f"  {k:34s} p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms"
            f"  (GET /health p50 {r['health_p50_ms']:.1f} ms)"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
