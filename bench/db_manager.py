"""Executors through `turnrelay db-manager` vs their own database pools.

1. PostgreSQL connections (pg_stat_activity, each backend attributed to the
   process holding its client socket) while 6 executors x 5 workers are busy:
   executors with TURNRELAY_DATABASE_URL (direct) vs through one db-manager.
2. The latency one call adds: get_turn and save_partial from this process,
   direct (SqlChatStore, its own pool) vs the RPC client to a db-manager on
   the same database; the direct figures are the baseline of the same run.

Each figure is the median over ROUNDS rounds. The first-delta figure of both
modes is `python bench/first_delta.py --modes distributed,db-manager`.

    python bench/db_manager.py [--rounds 3] [--calls 500] [--executors 6] [--workers 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import POSTGRES_URL  # noqa: E402
from tests.e2e.cluster import DB_MANAGER_SECRET, Cluster  # noqa: E402
from tests.procs import FakeLLMProc, start_fake_llm  # noqa: E402

from bench.first_delta import percentile  # noqa: E402
from turnrelay.store.base import NewTurn  # noqa: E402
from turnrelay.store.rpc_client import RpcExecutorStore  # noqa: E402
from turnrelay.store.sql import SqlChatStore  # noqa: E402

AUTH = {"authorization": "Bearer tok-alice"}
BUSY_TURN = " ".join(f"w{i}" for i in range(40)) + " fake:delay_ms=30"


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


class ConnectionSampler:
    """Samples pg_stat_activity of one database every few ms; keeps the peak
    per role, a role being the process (of ``roles``) holding the client socket."""

    def __init__(self, database_url: str, db_name: str, roles: dict[int, str]) -> None:
        self.url, self.db_name, self.roles = database_url, db_name, roles
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def _owners(self) -> dict[int, str]:
        ports: dict[int, str] = {}
        for pid, role in self.roles.items():
            try:
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == 5432:
                        ports[conn.laddr.port] = role
            except psutil.Error:
                continue
        return ports

    async def _run(self) -> None:
        conn = await asyncpg.connect(_dsn(self.url))
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(
                    "SELECT client_port FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    self.db_name,
                )
                owners = self._owners()
                counts: dict[str, int] = {}
                for row in rows:
                    role = owners.get(row["client_port"], "other")
                    counts[role] = counts.get(role, 0) + 1
                counts["total"] = len(rows)
                for role, n in counts.items():
                    self.peak[role] = max(self.peak.get(role, 0), n)
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def _load(api_url: str, turns: int) -> None:
    async with httpx.AsyncClient(base_url=api_url, headers=AUTH, timeout=120) as client:
        sids = [(await client.post("/api/chat/sessions")).json()["id"] for _ in range(turns)]
        ids = []
        for sid in sids:
            r = await client.post(f"/api/chat/sessions/{sid}/turns", json={"message": BUSY_TURN})
            r.raise_for_status()
            ids.append((sid, r.json()["turn_id"]))
        deadline = time.monotonic() + 120
        for sid, turn_id in ids:
            while True:
                status = (await client.get(f"/api/chat/sessions/{sid}/turns/{turn_id}")).json()
                if status["status"] == "completed":
                    break
                if status["status"] in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise RuntimeError(f"turn {turn_id}: {status}")
                await asyncio.sleep(0.1)


def connections(tmp: Path, llm: FakeLLMProc, mode: str, executors: int, workers: int) -> dict:
    cluster = Cluster(
        tmp=tmp,
        llm=llm,
        postgres_url=POSTGRES_URL,
        mode=mode,
        extra_env={"TURNRELAY_NUM_WORKERS": str(workers)},
    )
    cluster.create()
    try:
        roles: dict[int, str] = {}
        if mode == "db-manager":
            roles[cluster.start_db_manager().popen.pid] = "db-manager"
        api = cluster.start_api()
        roles[api.popen.pid] = "api"
        for _ in range(executors):
            roles[cluster.start_executor().popen.pid] = "executors"
        with ConnectionSampler(cluster.database_url, cluster.db_name, roles) as sampler:
            asyncio.run(_load(api.url, executors * workers * 2))
        return dict(sampler.peak)
    finally:
        cluster.stop()


async def _latency(database_url: str, manager_url: str, calls: int) -> dict[str, dict]:
    direct = SqlChatStore(database_url)
    rpc = RpcExecutorStore(manager_url, secret=DB_MANAGER_SECRET)
    await direct.startup()
    await rpc.startup()
    try:
        session = await direct.create_session("alice")
        new = NewTurn(session_id=session.id, user_id="alice", text="hi", model="fake:m")
        turn = (await direct.submit_turn(new)).turn
        await direct.start_turn(turn.id, 0)
        parts = [{"type": "text", "text": "x" * 400}]
        results: dict[str, dict] = {}
        for name, store in (("direct", direct), ("db-manager", rpc)):
            for method in ("get_turn", "save_partial"):
                samples = []
                for i in range(calls):
                    t0 = time.perf_counter()
                    if method == "get_turn":
                        await store.get_turn(turn.id)
                    else:
                        await store.save_partial(turn.id, 1, f"answer {i}", parts)
                    samples.append((time.perf_counter() - t0) * 1000)
                results.setdefault(method, {})[name] = {
                    "p50_ms": percentile(samples, 0.5),
                    "p99_ms": percentile(samples, 0.99),
                }
        return results
    finally:
        await rpc.shutdown()
        await direct.shutdown()


def latency(tmp: Path, llm: FakeLLMProc, calls: int) -> dict[str, dict]:
    cluster = Cluster(tmp=tmp, llm=llm, postgres_url=POSTGRES_URL, mode="db-manager")
    cluster.create()
    try:
        manager = cluster.start_db_manager()
        return asyncio.run(_latency(cluster.database_url, manager.url, calls))
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--executors", type=int, default=6)
    parser.add_argument("--workers", type=int, default=5)
    args = parser.parse_args()
    peaks: dict[str, list[dict]] = {"direct": [], "db-manager": []}
    calls: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        llm = start_fake_llm(tmp)
        try:
            for _ in range(args.rounds):
                for mode in peaks:
                    peaks[mode].append(connections(tmp, llm, mode, args.executors, args.workers))
                calls.append(latency(tmp, llm, args.calls))
        finally:
            llm.proc.stop()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(
        f"peak PostgreSQL connections, {args.executors} executors x {args.workers} workers "
        f"busy (median of {args.rounds} rounds)"
    )
    summary: dict[str, object] = {"connections": {}, "latency": {}}
    for mode, runs in peaks.items():
        roles = sorted({role for run in runs for role in run})
        row = {role: med([run.get(role, 0) for run in runs]) for role in roles}
        summary["connections"][mode] = row  # type: ignore[index]
        print(f"  {mode:12s} " + "  ".join(f"{r} {v:g}" for r, v in row.items()))
    print(f"latency per call, {args.calls} sequential calls (median of rounds)")
    for method in ("get_turn", "save_partial"):
        for mode in ("direct", "db-manager"):
            p50 = med([c[method][mode]["p50_ms"] for c in calls])
            p99 = med([c[method][mode]["p99_ms"] for c in calls])
            summary["latency"].setdefault(method, {})[mode] = {"p50_ms": p50, "p99_ms": p99}  # type: ignore[union-attr]
            print(f"  {method:13s} {mode:11s} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
