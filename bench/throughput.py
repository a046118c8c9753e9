"""Single-turn relay throughput and server CPU per token: one turn of TOKENS
tokens from an instant model, through embedded `turnrelay serve` pinned to CPU
0 (the client and the fake model on CPU 1), timed from `POST …/stream` to
`[DONE]`, with the server's CPU seconds over the same span.

The baseline, in the same run, is the fake model alone: the same TOKENS tokens
streamed straight to the client. The report gives the median over ROUNDS turns.

    python bench/throughput.py [--tokens 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import FakeLLMProc, start_fake_llm  # noqa: E402
from tests.procs import tokens as token_text  # noqa: E402

from bench.concurrency import AUTH, cpu_seconds, pin, start_embedded  # noqa: E402


def via_serve(url: str, pid: int, tokens: int) -> tuple[float, float]:
    """(seconds, server CPU seconds) of one turn, checked whole and exact."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        sid = client.post("/api/chat/sessions").json()["id"]
        text, done = [], False
        cpu0, t0 = cpu_seconds([pid]), time.perf_counter()
        with client.stream(
            "POST", f"/api/chat/sessions/{sid}/stream", json={"message": f"fake:tokens={tokens}"}
        ) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["type"] == "text-delta":
                        text.append(chunk["delta"])
        took, cpu = time.perf_counter() - t0, cpu_seconds([pid]) - cpu0
    if not done or "".join(text) != token_text(tokens):
        raise RuntimeError("the turn's text was not whole and exact")
    return took, cpu


def direct(llm: FakeLLMProc, tokens: int) -> float:
    body = {
        "model": "fake",
        "stream": True,
        "messages": [{"role": "user", "content": f"fake:tokens={tokens}"}],
    }
    t0 = time.perf_counter()
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{llm.base_url}/chat/completions", json=body) as r,
    ):
        for _ in r.iter_lines():
            pass
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        llm = start_fake_llm(tmp)
        pin(llm.proc.popen.pid, {1})
        serve, pids = start_embedded(tmp, llm, 5)
        try:
            via_serve(serve.url, pids[0], 200)  # warm up
            base = [direct(llm, args.tokens) for _ in range(args.rounds)]
            runs = [via_serve(serve.url, pids[0], args.tokens) for _ in range(args.rounds)]
        finally:
            serve.stop()
            llm.proc.stop()
    took = statistics.median(t for t, _ in runs)
    cpu = statistics.median(c for _, c in runs)
    alone = statistics.median(base)
    print(f"one turn of {args.tokens} tokens, instant model, median of {args.rounds}")
    print(
        f"  turnrelay serve: {args.tokens / took:8.0f} tokens/s, "
        f"{cpu / args.tokens * 1e6:5.1f} µs server CPU per token ({took:.2f} s, CPU {cpu:.2f} s)"
    )
    print(f"  fake model alone: {args.tokens / alone:7.0f} tokens/s ({alone:.2f} s)")
    print(
        json.dumps(
            {"tokens": args.tokens, "seconds": took, "server_cpu": cpu, "model_alone": alone}
        )
    )


if __name__ == "__main__":
    main()
