"""The first query after `cbir serve` says it is serving, against the tenth: is the server warm when it says so?

    python benchmarks/first_query.py --index IDX --image photo.jpg [--checkouts A,B] [--rounds 3] [--queries 10]

Each round starts `cbir serve IDX` as a fresh process on 127.0.0.1 (from each checkout in turn, alternating, so the
machine's noise falls on all alike), waits for its "serving" line, then uploads the same photo `--queries` times
one after the other and times each answer on the client. Reported per checkout: the median over rounds of the first
query's ms, of the median of the others, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_round(checkout: Path, index: str, image: bytes, queries: int) -> list[float]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    server = subprocess.Popen([sys.executable, "-m", "cbir", "serve", index, "--port", str(port), "--device", "cpu"],
                              cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        if not line.startswith("serving"):
            raise SystemExit(f"{checkout}: the server did not start: {line!r}")
        times = []
        for _ in range(queries):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/search?k=10", data=image,
                                             headers={"Content-Type": "image/jpeg"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as resp:
                resp.read()
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--checkouts", default=str(Path(__file__).resolve().parent.parent),
                    help="comma-separated project folders whose `cbir serve` to time (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=10)
    args = ap.parse_args()
    checkouts = [Path(c).resolve() for c in args.checkouts.split(",")]
    image = Path(args.image).read_bytes()
    got: dict[Path, list[list[float]]] = {c: [] for c in checkouts}
    for r in range(args.rounds):
        for c in checkouts:
            got[c].append(one_round(c, args.index, image, args.queries))
            print(f"round {r + 1}, {c}: " + " ".join(f"{t:.0f}" for t in got[c][-1]), flush=True)
    print(f"\n{args.rounds} rounds, {args.queries} uploads each, ms on the client (medians over rounds)")
    print("| checkout | first query | queries 2-n (median) | first / rest |")
    print("|---|---|---|---|")
    for c, rounds in got.items():
        first = float(np.median([t[0] for t in rounds]))
        rest = float(np.median([np.median(t[1:]) for t in rounds]))
        print(f"| {c} | {first:.0f} | {rest:.0f} | {first / rest:.2f} |")


if __name__ == "__main__":
    main()
