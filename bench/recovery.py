"""Recovery time: how long a reader watches a frozen answer when the executor
running its turn dies (kill -9) or freezes (SIGSTOP), until the first frame of
the new attempt (`data-turn-retry`) reaches it.

Real processes: one `turnrelay api`, two `turnrelay executor`s, the fake model,
RabbitMQ, Redis, PostgreSQL, on the default lease and liveness settings. Each
round starts a slow turn, waits until it streams, signals the executor running
it, and times the gap at a client that keeps reading the stream (resuming with
its cursor when the stream breaks). A frozen executor is continued afterwards
(SIGCONT) and checked to write nothing more. The report gives the median of the
rounds, per fault.

    python bench/recovery.py [--rounds 5] [--faults kill,stop]

To measure another checkout of turnrelay with the same harness, put its `src`
first on PYTHONPATH (the spawned processes inherit it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import POSTGRES_URL  # noqa: E402
from tests.e2e.cluster import Cluster  # noqa: E402
from tests.procs import Proc, iter_sse, start_fake_llm  # noqa: E402

AUTH = {"authorization": "Bearer tok-alice"}
TIMEOUT = 120.0


def running_on(cluster: Cluster) -> Proc:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for ex in cluster.executors:
            if ex.popen.poll() is not None:
                continue
            try:
                if httpx.get(f"{ex.url}/health", timeout=1).json()["active_turns"]:
                    return ex
            except httpx.HTTPError:
                continue
        time.sleep(0.02)
    raise RuntimeError("no executor picked up the turn")


def one_round(cluster: Cluster, fault: str) -> float:
    """Seconds from the signal to the new attempt's first frame at the reader."""
    api = cluster.apis[0]
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=TIMEOUT) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        client.post(
            f"/api/chat/sessions/{sid}/turns",
            json={"message": "recover fake:tokens=400 fake:delay_ms=50"},
        )
        signalled = threading.Event()
        sent_at = 0.0
        retry_at: list[float] = []
        cursor: str | None = None
        victim: Proc | None = None
        deadline = time.monotonic() + TIMEOUT
        while not retry_at and time.monotonic() < deadline:
            headers = {"Last-Event-ID": cursor} if cursor else {}
            try:
                with client.stream("GET", f"/api/chat/sessions/{sid}/stream", headers=headers) as r:
                    for ident, data in iter_sse(r):
                        if data is None:
                            continue
                        cursor = ident or cursor
                        if '"data-turn-retry"' in data:
                            retry_at.append(time.monotonic())
                            break
                        if not signalled.is_set() and cursor and int(cursor.split(":")[1]) >= 5:
                            victim = running_on(cluster)
                            sent_at = time.monotonic()
                            victim.popen.send_signal(
                                signal.SIGKILL if fault == "kill" else signal.SIGSTOP
                            )
                            signalled.set()
            except httpx.HTTPError:
                time.sleep(0.05)
        assert victim is not None and retry_at, "the turn was never retried"
        gap = retry_at[0] - sent_at
        if fault == "stop":
            victim.popen.send_signal(signal.SIGCONT)
        else:
            victim.popen.wait(5)
            cluster.executors.remove(victim)
            cluster.start_executor()
        # let the turn finish before the next round, on whichever executor
        with client.stream(
            "GET", f"/api/chat/sessions/{sid}/stream", headers={"Last-Event-ID": cursor or ""}
        ) as r:
            for _ in iter_sse(r):
                pass
        return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--faults", default="kill,stop")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="recovery-"))
    llm = start_fake_llm(tmp)
    cluster = Cluster(tmp=tmp, llm=llm, postgres_url=POSTGRES_URL)
    report: dict[str, object] = {"code": os.environ.get("PYTHONPATH", "this checkout")}
    try:
        cluster.create()
        cluster.start_api()
        cluster.start_executor()
        cluster.start_executor()
        for fault in args.faults.split(","):
            gaps = [one_round(cluster, fault) for _ in range(args.rounds)]
            report[fault] = {
                "median_s": round(statistics.median(gaps), 2),
                "min_s": round(min(gaps), 2),
                "max_s": round(max(gaps), 2),
                "rounds": [round(g, 2) for g in gaps],
            }
            print(fault, report[fault], file=sys.stderr)
    finally:
        for ex in cluster.executors:
            if ex.popen.poll() is None:
                ex.popen.send_signal(signal.SIGCONT)
        cluster.stop()
        llm.proc.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
