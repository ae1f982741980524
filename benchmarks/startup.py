"""Start-up: whole commands as fresh processes, wall time including every import (median of --repeats).

    python benchmarks/startup.py --data ../shared/data/animals4 --work /tmp/cbir-startup

  cbir search   one query against an existing index, for an fp32 index (query embedded through the cached,
                verified ONNX model: no torch) and a bf16 index (torch, as its rows were embedded)
  cbir index    --rebuild of 600 photos (640x480) in the default settings (the numeric-mode measurement cached,
                as on every run after the first on a machine), against a naive loop run the same way: a fresh
                process that imports torch and timm, builds the same network, then opens each image, resizes it
                and runs one fp32 eager forward at a time
The processes run one after another, alternating, so that the machine's noise falls on all of them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

NAIVE = """
import sys, torch, numpy as np
from pathlib import Path
from PIL import Image
from cbir.encoders import create
enc = create("efficientnet_lite0", device="cpu", precision="fp32", fold_batchnorm=False)
pre, model = enc.preprocess, enc.model.to(memory_format=torch.contiguous_format)
mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
out = []
with torch.no_grad():
    for f in sorted(Path(sys.argv[1]).glob("*.jpg")):
        im = Image.open(f).convert("RGB")
        w, h = im.size
        scale = pre.draft_size / min(w, h)
        nw, nh = max(pre.size, round(w * scale)), max(pre.size, round(h * scale))
        left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
        im = im.resize((nw, nh), Image.BILINEAR).crop((left, top, left + pre.size, top + pre.size))
        x = (np.asarray(im, np.float32) / 255 - mean) / std
        out.append(model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]).numpy())
np.save(sys.argv[2], np.concatenate(out))
"""


def wall(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t


def main() -> None:
    from index_throughput import make_inputs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(args.work)
    small, _ = make_inputs(Path(args.data), work, 600, 0)
    env = {**os.environ, "CBIR_CACHE": str(work / "cache")}
    py = sys.executable
    query = str(sorted(small.glob("*.jpg"))[7])
    for precision in ("fp32", "bf16"):  # the indexes, and the one-time preparations (ONNX export, measurement)
        subprocess.run([py, "-m", "cbir", "index", str(small), "--out", str(work / precision), "--rebuild", "-q",
                        "--precision", precision], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        subprocess.run([py, "-m", "cbir", "search", str(work / precision), query], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall([py, "-m", "cbir", "index", str(small), "--out", str(work / "auto"), "--rebuild", "-q"], env)
    runs: dict[str, list[float]] = {"search fp32": [], "search bf16": [], "index": [], "naive": []}
    for _ in range(args.repeats):
        for precision in ("fp32", "bf16"):
            runs[f"search {precision}"].append(wall([py, "-m", "cbir", "search", str(work / precision), query], env))
        runs["index"].append(wall([py, "-m", "cbir", "index", str(small), "--out", str(work / "auto"), "--rebuild",
                                   "-q"], env))
        runs["naive"].append(wall([py, "-c", NAIVE, str(small), str(work / "naive.npy")], env))
    print(f"{os.cpu_count()} cores; wall seconds of fresh processes, median of {args.repeats}")
    print("| command | median s | runs |")
    print("|---|---|---|")
    for name, times in runs.items():
        print(f"| {name} | {median(times):.2f} | {' / '.join(f'{t:.2f}' for t in times)} |")
    print(f"\ncbir index of 600 photos / naive loop, wall including start-up: "
          f"{median(runs['naive']) / median(runs['index']):.2f}x faster")


if __name__ == "__main__":
    main()
