"""`cbir search --copies` as a command, start-up included, beside a plain `cbir search`: wall seconds per run.

    python benchmarks/copies_command.py --query copy.jpg --setup CHECKOUT=IDX [--setup CHECKOUT2=IDX2] [--runs 5]

Each setup is a project folder and an index it reads (an older checkout needs an index of its own format). Runs
alternate between setups and between plain and --copies, so the machine's noise falls on all alike; one untimed
run of each first (the ONNX query model is exported on a machine's first search). Reported: median seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def timed(checkout: Path, index: str, query: str, copies: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [sys.executable, "-m", "cbir", "search", index, query, "-k", "10", *(["--copies"] if copies else [])]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--query", required=True)
    ap.add_argument("--setup", action="append", required=True, metavar="CHECKOUT=INDEX")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    setups = [(Path(c).resolve(), i) for c, i in (s.split("=", 1) for s in args.setup)]
    for checkout, index in setups:
        for copies in (False, True):
            timed(checkout, index, args.query, copies)
    got: dict[tuple[Path, bool], list[float]] = {(c, f): [] for c, _ in setups for f in (False, True)}
    for _ in range(args.runs):
        for checkout, index in setups:
            for copies in (False, True):
                got[checkout, copies].append(timed(checkout, index, args.query, copies))
    print(f"{args.runs} runs each, fresh processes, median wall seconds")
    print("| checkout | cbir search | cbir search --copies |")
    print("|---|---|---|")
    for checkout, _ in setups:
        print(f"| {checkout} | {np.median(got[checkout, False]):.2f} | {np.median(got[checkout, True]):.2f} |")


if __name__ == "__main__":
    main()
