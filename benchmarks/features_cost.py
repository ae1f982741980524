"""What keeping local features per picture costs `cbir index`: the same folder indexed with and without them.

    python benchmarks/features_cost.py --data ../shared/data/animals4/cat --work /tmp/fc [--runs 3]

Each run is a fresh `cbir index DIR --rebuild` process (start-up included), alternating with and without
`--no-local-features`, so the machine's noise falls on both alike. Reported: median seconds, images/s, the size of
the index folder, and the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def run(data: Path, out: Path, *extra: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cbir", "index", str(data), "--out", str(out), "--rebuild", "-q",
                           "--precision", "fp32", *extra], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip())
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from cbir.images import discover

    data, work = Path(args.data), Path(args.work)
    images = len(discover(data).files)
    setups = {"with local features (default)": (), "--no-local-features": ("--no-local-features",)}
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.runs):
        for name, extra in setups.items():
            seconds[name].append(run(data, work / name.strip("-").split()[0], *extra))
    print(f"{images} images, {args.runs} runs each, fresh processes (medians)")
    print("| index | seconds | images/s | folder size |")
    print("|---|---|---|---|")
    for name in setups:
        folder = work / name.strip("-").split()[0]
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        s = float(np.median(seconds[name]))
        print(f"| {name} | {s:.1f} | {images / s:.1f} | {size / 2**20:.1f} MB |")
    a, b = (float(np.median(v)) for v in seconds.values())
    print(f"\nkeeping local features: {a / b:.2f}x the time")


if __name__ == "__main__":
    main()
