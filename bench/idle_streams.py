"""Memory per idle SSE stream: N streams held open at once by one `turnrelay
serve` (embedded defaults, its own data dir), against a raw Starlette SSE
endpoint under the same uvicorn settings (bench/raw_sse.py) holding the same N
connections, in the same run.

An idle stream is a reader of a running turn that has streamed its first token
and then waits (the fake model's `fake:tokens=2 fake:delay_ms=<hold>`: `t0` at
once, `t1` after the hold), getting only pings (every 10 s by default). Two
layouts:

- `shared` (default): one running turn per user, each read by READERS streams
  (`GET …/stream`, the per-user cap `MAX_STREAMS_PER_USER` is 20), so the
  figure is the SSE connection itself: the server's RSS with the turns running
  and no stream, then with all N streams, divided by N.
- `own`: every stream is its own turn (`POST …/stream`), so the figure is a
  running turn plus its stream (embedded: the executor's worker, its model
  request); N is at most 1000 (`NUM_WORKERS`' cap).

The client holds every connection as a raw asyncio socket (no HTTP client
state) and counts a stream held once its first `text-delta` (the baseline: its
first frame) has arrived. RSS is `VmRSS` from /proc/PID/status, after a
warm-up of 20 streams opened and closed, and again HOLD seconds (12: past one
ping) after the last stream is held; a stream the server ended meanwhile is
counted as dropped.

    python bench/idle_streams.py [--n 1000,5000] [--layout shared|own] [--readers 20] [--hold 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import FakeLLMProc, Proc, free_port, start, start_fake_llm  # noqa: E402

HOLD_MS = 3_600_000  # the turn's second token comes after the benchmark is over
OPENERS = 100  # connections being opened at once
OPEN_TIMEOUT = 120.0


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def raise_nofile() -> None:
    """Soft open-files limit up to the hard one; children (both servers) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Held:
    conns: list[Conn]
    errors: list[str]
    seconds: float

    def dropped(self) -> int:
        """Streams the server has ended since they were held."""
        return sum(1 for r, _ in self.conns if r.at_eof())

    def close(self) -> None:
        for _, w in self.conns:
            w.close()


def request_bytes(method: str, path: str, token: str | None, body: dict[str, str] | None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


async def open_one(port: int, request: bytes, marker: bytes, sem: asyncio.Semaphore) -> Conn:
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            buf = b""
            while marker not in buf:
                chunk = await asyncio.wait_for(reader.read(65536), OPEN_TIMEOUT)
                if not chunk:
                    raise ConnectionError(f"closed before the first frame: {buf[:200]!r}")
                buf += chunk
            if not buf.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"not a 200: {buf[:200]!r}")
        except BaseException:
            writer.close()
            raise
        return reader, writer


async def hold(port: int, requests: list[bytes], marker: bytes) -> Held:
    sem = asyncio.Semaphore(OPENERS)
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(open_one(port, r, marker, sem) for r in requests), return_exceptions=True
    )
    seconds = time.perf_counter() - t0
    conns = [r for r in results if isinstance(r, tuple)]
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return Held(conns, errors, seconds)


async def measure(
    pid: int,
    port: int,
    warm: list[bytes],
    requests: list[bytes],
    marker: bytes,
    hold_s: float,
    after_warm: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, float]:
    """Warm up, RSS before; hold every request's stream for ``hold_s``, RSS
    after; close them."""
    warmed = await hold(port, warm, marker)
    warmed.close()
    if after_warm is not None:
        await after_warm()
    await asyncio.sleep(1.0)
    before, fds_before = rss_kib(pid), fds(pid)
    held = await hold(port, requests, marker)
    await asyncio.sleep(hold_s)
    up = alive(pid)
    after = rss_kib(pid) if up else float("nan")
    fds_after = fds(pid) if up else float("nan")
    dropped = held.dropped()
    held.close()
    n = len(held.conns)
    return {
        "asked": len(requests),
        "held": n,
        "errors": len(held.errors),
        "dropped": dropped,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_stream": (after - before) / n if n else float("nan"),
        "fds_added": fds_after - fds_before,
        "open_seconds": held.seconds,
        "first_error": held.errors[0] if held.errors else "",
        "server_alive": up,
    }


# -- the baseline ------------------------------------------------------------------------


def baseline(tmp: Path, n: int, hold_s: float) -> dict[str, float]:
    port = free_port()
    log = (tmp / f"raw-sse-{n}.log").open("wb")
    popen = subprocess.Popen(
        [sys.executable, "-m", "bench.raw_sse", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"raw SSE server did not start: {(tmp / log.name).read_text()}")
            time.sleep(0.1)
        request = request_bytes("GET", "/stream", None, None)
        warm, requests = [request] * 20, [request] * n
        return asyncio.run(measure(popen.pid, port, warm, requests, b"data:", hold_s))
    finally:
        popen.kill()
        popen.wait(5)


# -- turnrelay ---------------------------------------------------------------------------


def start_serve(tmp: Path, llm: FakeLLMProc, users: int, env: dict[str, str]) -> Proc:
    port = free_port()
    keys = ",".join(f"tok-{u}=user-{u}" for u in range(users))
    proc = start(
        "serve",
        ["serve", "--port", str(port)],
        env={
            "TURNRELAY_MODEL": "openai:fake",
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "unused",
            "TURNRELAY_API_KEYS": keys,
            **env,
        },
        tmp=tmp,
        health_url=f"http://127.0.0.1:{port}/health",
    )
    proc.url = f"http://127.0.0.1:{port}"
    return proc


HOLD_MESSAGE = f"fake:tokens=2 fake:delay_ms={HOLD_MS}"
MARKER = b'"text-delta"'


def wait_streaming(client: httpx.Client, sid: str, token: str) -> None:
    """Until the session's turn has logged its first token (a reader then holds at once)."""
    deadline = time.monotonic() + 120
    headers = {"authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        with client.stream("GET", f"/api/chat/sessions/{sid}/stream", headers=headers) as r:
            if r.status_code == 200:
                for line in r.iter_lines():
                    if '"text-delta"' in line:
                        return
        time.sleep(0.2)
    raise RuntimeError(f"session {sid}: the turn never streamed")


def turnrelay_shared(
    tmp: Path, llm: FakeLLMProc, n: int, readers: int, hold_s: float
) -> dict[str, float]:
    users = math.ceil(n / readers) + 1  # user 0 warms up
    serve = start_serve(tmp, llm, users, {"TURNRELAY_NUM_WORKERS": str(min(users, 1000))})
    try:
        sids: list[str] = []
        with httpx.Client(base_url=serve.url, timeout=60) as client:
            for u in range(users):
                auth = {"authorization": f"Bearer tok-{u}"}
                sid = client.post("/api/chat/sessions", headers=auth).json()["id"]
                r = client.post(
                    f"/api/chat/sessions/{sid}/turns", headers=auth, json={"message": HOLD_MESSAGE}
                )
                assert r.status_code == 202, r.text
                sids.append(sid)
            for u, sid in enumerate(sids):
                wait_streaming(client, sid, f"tok-{u}")

        def get(u: int) -> bytes:
            return request_bytes("GET", f"/api/chat/sessions/{sids[u]}/stream", f"tok-{u}", None)

        warm = [get(0)] * min(20, readers)
        requests = [get(1 + k // readers) for k in range(n)]
        port = int(serve.url.rsplit(":", 1)[1])
        got = asyncio.run(measure(serve.popen.pid, port, warm, requests, MARKER, hold_s))
        got["turns"] = users
        return got
    finally:
        log = serve.log()
        serve.kill()
        (tmp / "serve-shared.log").write_text(log)


def turnrelay_own(
    tmp: Path, llm: FakeLLMProc, n: int, readers: int, hold_s: float
) -> dict[str, float]:
    if n > 1000:
        raise SystemExit("--layout own: N is at most 1000 (TURNRELAY_NUM_WORKERS' cap)")
    users = math.ceil(n / readers) + 1
    serve = start_serve(
        tmp,
        llm,
        users,
        {
            "TURNRELAY_NUM_WORKERS": "1000",
            "TURNRELAY_MAX_RUNNING_TURNS_PER_USER": str(readers),
        },
    )
    try:
        with httpx.Client(base_url=serve.url, timeout=60) as client:
            sids = [
                client.post(
                    "/api/chat/sessions", headers={"authorization": f"Bearer tok-{u}"}
                ).json()["id"]
                for u in range(users)
                for _ in range(readers)
            ]

        def post(k: int) -> bytes:
            u = k // readers
            body = {"message": HOLD_MESSAGE}
            return request_bytes("POST", f"/api/chat/sessions/{sids[k]}/stream", f"tok-{u}", body)

        warm = [post(k) for k in range(min(20, readers))]
        requests = [post(readers + k) for k in range(n)]

        async def cancel_warm() -> None:
            """The warm-up's turns still run: cancelled, they free their workers."""
            auth = {"authorization": "Bearer tok-0"}
            async with httpx.AsyncClient(base_url=serve.url, headers=auth, timeout=60) as c:
                for sid in sids[: len(warm)]:
                    r = await c.post(f"/api/chat/sessions/{sid}/cancel")
                    assert r.json().get("cancelled"), r.text

        port = int(serve.url.rsplit(":", 1)[1])
        got = asyncio.run(
            measure(serve.popen.pid, port, warm, requests, MARKER, hold_s, cancel_warm)
        )
        got["turns"] = n
        return got
    finally:
        log = serve.log()
        serve.kill()
        (tmp / "serve-own.log").write_text(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="1000,5000")
    parser.add_argument("--layout", default="shared", choices=["shared", "own"])
    parser.add_argument("--readers", type=int, default=20, help="streams per user (and turn)")
    parser.add_argument(
        "--hold", type=float, default=12.0, help="seconds every stream is held (a ping is 10 s)"
    )
    args = parser.parse_args()
    raise_nofile()
    ns = [int(x) for x in args.n.split(",")]
    if nofile() < max(ns) + 200:
        raise SystemExit(f"open-files limit {nofile()} is below N; raise `ulimit -Hn`")
    run: Callable[[Path, FakeLLMProc, int, int, float], dict[str, float]] = (
        turnrelay_shared if args.layout == "shared" else turnrelay_own
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        llm = start_fake_llm(tmp)
        try:
            for n in ns:
                (tmp / str(n)).mkdir()
                base = baseline(tmp / str(n), n, args.hold)
                got = run(tmp / str(n), llm, n, args.readers, args.hold)
                rows.append((n, base, got))
        finally:
            llm.proc.stop()
    print(f"idle SSE streams held by one process ({args.layout} layout, {args.readers} per user)")
    print(
        "     N | turnrelay KiB/stream | raw Starlette KiB/stream | held (turnrelay / raw) "
        "| errors / dropped | RSS before -> after (MiB) | open (s)"
    )
    for n, base, got in rows:
        lost = (
            f"{got['errors']:.0f}+{got['dropped']:.0f} / {base['errors']:.0f}+{base['dropped']:.0f}"
        )
        print(
            f"{n:6d} | {got['kib_per_stream']:20.1f} | {base['kib_per_stream']:24.1f} "
            f"| {got['held']:.0f} / {base['held']:.0f} | {lost} "
            f"| {got['rss_before_kib'] / 1024:.0f} -> {got['rss_after_kib'] / 1024:.0f} "
            f"| {got['open_seconds']:.1f}"
        )
        if got["first_error"]:
            print(f"  first turnrelay error: {got['first_error']}")
    print(json.dumps([{"n": n, "raw_starlette": b, "turnrelay": g} for n, b, g in rows]))


if __name__ == "__main__":
    main()
