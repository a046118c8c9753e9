"""Child processes for the tests of two writers racing: each a ``python -m MODULE``
that prints ``ready``, then answers one line on stdout per line on stdin, and ends
on an empty line or when its stdin closes."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

Racer = asyncio.subprocess.Process


async def start_racer(module: str, *args: str) -> Racer:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    ready = await asyncio.wait_for(process.stdout.readline(), 30)
    assert ready == b"ready\n", ready
    return process


async def release(racers: Sequence[Racer], lines: Sequence[str]) -> None:
    """Give each racer its line, all written before any is drained: they start at once."""
    for racer, line in zip(racers, lines, strict=True):
        assert racer.stdin is not None
        racer.stdin.write(f"{line}\n".encode())
    for racer in racers:
        assert racer.stdin is not None
        await racer.stdin.drain()


async def answer(racer: Racer, timeout: float = 15) -> str:
    assert racer.stdout is not None
    line = await asyncio.wait_for(racer.stdout.readline(), timeout)
    return line.decode().strip()


async def end_racers(racers: Sequence[Racer]) -> None:
    for racer in racers:
        assert racer.stdin is not None
        racer.stdin.close()
    for racer in racers:
        try:
            await asyncio.wait_for(racer.wait(), 10)
        except TimeoutError:
            racer.kill()
            await racer.wait()
