"""Before and after in the same run: a concurrency benchmark, alternating two checkouts.

This machine's speed drifts by a third within minutes (other work shares it),
so a change is measured against the code before it run for run: each of RUNS
rounds runs ``bench/concurrency.py`` once with the server processes importing
the ``--base`` checkout's ``src`` (``PYTHONPATH``) and once with this one, in
alternating order, and the medians of both are printed side by side. With
``--after`` the "after" side is another checkout too (so this one can change
while it runs).

    git worktree add /tmp/base <commit>
    python bench/compare.py --base /tmp/base --runs 5 -- --n 500 --tokens 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("first_p50", "first_p99", "gap_p99", "total", "cpu", "cut")


def run_once(args: list[str], base: Path | None) -> list[dict[str, object]]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if base is not None:
        env["PYTHONPATH"] = str(base / "src")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "concurrency.py"), "--rounds", "1", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        side = base if base is not None else ROOT
        sys.exit(f"concurrency.py failed against {side} (exit {done.returncode}):\n{done.stderr}")
    out = done.stdout
    rows: list[dict[str, object]] = json.loads(out.strip().splitlines()[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="checkout of the code before")
    parser.add_argument("--after", type=Path, help="checkout of the code after (default: this)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    args = [a for a in opts.bench_args if a != "--"]
    got: dict[str, list[list[dict[str, object]]]] = {"before": [], "after": []}
    for i in range(opts.runs):
        order = [("before", opts.base), ("after", opts.after)]
        if i % 2:
            order.reverse()
        for label, base in order:
            got[label].append(run_once(args, base))
            print(f"run {i + 1} {label}: {json.dumps(got[label][-1])}", file=sys.stderr)
    print(f"median of {opts.runs} alternating runs, bench/concurrency.py {' '.join(args)}")
    print("   N | code   | " + " | ".join(f"{f:>9}" for f in FIELDS))
    for index, row in enumerate(got["after"][0]):
        for label in ("before", "after"):
            values = [
                statistics.median(
                    float(run[index]["turnrelay"][f])  # type: ignore[index]
                    for run in got[label]
                )
                for f in FIELDS
            ]
            cells = " | ".join(f"{v:9.3f}" for v in values)
            print(f"{row['n']:>4} | {label:6} | {cells}")


if __name__ == "__main__":
    main()
