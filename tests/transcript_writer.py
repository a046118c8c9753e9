"""A process that compacts transcripts of one chat session when told to, for the
test of two writers racing: ``python -m tests.transcript_writer SPEC_JSON SESSION``.

It prints ``ready``, then per line ``SEQ SIZE`` on stdin compacts a transcript of
about SIZE bytes as turn SEQ (attempt 1) and prints ``wrote`` or ``exists``; an
empty line ends it."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.storage_servers import StoreSpec
from turnrelay.transcript.store import TranscriptStore

KEY = {"project_key": "turnrelay", "session_id": "0b5e7a2c-0000-4000-8000-000000000001"}
USER = "alice"


def transcript(seq: int, size: int) -> bytes:
    """A transcript of turn ``seq`` of at least ``size`` bytes, every line naming it."""
    line = json.dumps({"type": "user", "uuid": f"u{seq}", "seq": seq}).encode() + b"\n"
    return line * max(1, -(-size // len(line)))


async def _serve(spec: StoreSpec, session: str) -> None:
    objects = spec.build()
    await objects.startup()
    loop = asyncio.get_running_loop()
    try:
        print("ready", flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return
            seq, size = map(int, line.split())
            store = TranscriptStore(  # type: ignore[abstract]
                objects, user_id=USER, session_id=session, seq=seq, attempt=1
            )
            wrote = await store.compact(KEY, transcript(seq, size))  # type: ignore[arg-type]
            print("wrote" if wrote else "exists", flush=True)
    finally:
        await objects.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.transcript_writer SPEC_JSON SESSION")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(_serve(StoreSpec.from_json(sys.argv[1]), sys.argv[2]))
