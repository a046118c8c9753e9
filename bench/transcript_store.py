"""Time a `claude` turn spends on its stored transcript, per backend: the load at
the turn's start (which CLI session is the newest, its newest compacted
transcript, this attempt's appends, the history kept beside it) and the
compaction at its end (strip, the create-only write, removing what it
supersedes), for the transcript of a session growing turn
by turn. The SDK's appends during the turn are made (APPENDS batches a turn, as
the mirror flushes them) but not timed: they overlap the model call.

The transcript is synthetic, shaped like the bundled CLI's (per turn a user and
an assistant message, a tool call and its result, attachments and the CLI's
bookkeeping entries, about 8 KB of which the strip removes about 45 %).

    python bench/transcript_store.py [--turns 20] [--sessions 5] [--backends local,s3,gcs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.storage_servers import (  # noqa: E402
    StoreSpec,
    create_gcs_bucket,
    create_s3_bucket,
    fake_gcs_server,
    moto_server,
)

from bench.first_delta import percentile  # noqa: E402
from turnrelay.transcript.store import TranscriptStore, encode_lines  # noqa: E402
from turnrelay.transcript.strip import strip  # noqa: E402

KEY: Any = {"project_key": "turnrelay", "session_id": str(uuid.uuid4())}
APPENDS = 6


def turn_entries(seq: int, parent: str | None) -> list[dict[str, Any]]:
    """One turn's entries, chained, with padding the size of the CLI's."""
    pad = "x" * 600
    kinds = [
        ("queue-operation", 100),
        ("user", 700),
        ("attachment", 500),
        ("api-request", 1300),
        ("assistant", 1200),
        ("user", 900),
        ("api-request-shape", 1900),
        ("assistant", 1200),
        ("cost-state", 500),
        ("api-request-route", 60),
    ]
    entries = []
    for i, (kind, size) in enumerate(kinds):
        uuid_ = f"{seq}-{i}"
        entry: dict[str, Any] = {"type": kind, "uuid": uuid_, "parentUuid": parent}
        if kind == "attachment":
            entry["attachment"] = {"type": "prompt_snapshot", "text": pad[:size]}
        else:
            entry["message"] = {"content": (pad * 4)[:size]}
        entries.append(entry)
        parent = uuid_
    return entries


async def session(objects: Any, user: str, turns: int) -> tuple[list[float], list[float], int, int]:
    sid = str(uuid.uuid4())
    loads, compactions = [], []
    parent: str | None = None
    full = b""
    for seq in range(1, 1 + turns):
        store = TranscriptStore(  # type: ignore[abstract]
            objects, user_id=user, session_id=sid, seq=seq, attempt=1
        )
        t0 = time.perf_counter()
        await store.newest_cli_session(KEY["project_key"])
        await store.load_bytes(KEY)
        await store.history(KEY)
        loads.append(time.perf_counter() - t0)
        entries = turn_entries(seq, parent)
        parent = entries[-1]["uuid"]
        step = -(-len(entries) // APPENDS)
        for i in range(0, len(entries), step):
            await store.append(KEY, entries[i : i + step])
        full += encode_lines(entries)
        t1 = time.perf_counter()
        stripped = strip(full)
        await store.compact(KEY, stripped)
        compactions.append(time.perf_counter() - t1)
    return loads, compactions, len(full), len(stripped)


@contextlib.contextmanager
def backend(kind: str) -> Iterator[StoreSpec]:
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    if kind == "local":
        with tempfile.TemporaryDirectory() as tmp:
            yield StoreSpec("local", root=tmp)
    elif kind == "s3":
        with moto_server() as endpoint:
            create_s3_bucket(endpoint, bucket)
            yield StoreSpec("s3", bucket=bucket, prefix="bench", endpoint=endpoint)
    else:
        with fake_gcs_server() as url:
            create_gcs_bucket(url, bucket)
            yield StoreSpec("gcs", bucket=bucket, prefix="bench", endpoint=url)


async def measure(spec: StoreSpec, turns: int, sessions: int) -> dict[str, Any]:
    objects = spec.build()
    await objects.startup()
    try:
        loads: list[float] = []
        compactions: list[float] = []
        for n in range(sessions):
            load, compaction, full, stripped = await session(objects, f"user{n}", turns)
            loads += load
            compactions += compaction
    finally:
        await objects.shutdown()
    ms = 1000
    return {
        "backend": spec.kind,
        "turns": len(loads),
        "load_p50_ms": round(percentile(loads, 0.5) * ms, 2),
        "load_p90_ms": round(percentile(loads, 0.9) * ms, 2),
        "compact_p50_ms": round(percentile(compactions, 0.5) * ms, 2),
        "compact_p90_ms": round(percentile(compactions, 0.9) * ms, 2),
        "last_transcript_bytes": [full, stripped],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--backends", default="local,s3,gcs")
    args = parser.parse_args()
    for kind in args.backends.split(","):
        with backend(kind) as spec:
            result = asyncio.run(measure(spec, args.turns, args.sessions))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
