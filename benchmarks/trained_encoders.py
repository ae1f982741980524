"""Retrieval quality of the trainable encoders against their baselines, on a labelled image folder.

    python benchmarks/trained_encoders.py --data ../shared/data/animals4 --work /tmp/cbir-trained

Protocol (issue 3): the first 60% (by file name) of each class is the training folder (the trainer keeps
80/20 of it for train/val); all images are indexed; the other 40% are the queries, searched against the
whole index with the query itself left out; precision@10 by class label (the first folder).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cbir.images import discover
from cbir.search import store


def p_at_10(index_dir: Path, queries: set[str]) -> float:
    s = store.read(index_dir / "vectors.h5")
    labels = np.array([p.split("/")[0] for p in s.paths])
    q = np.array([i for i, p in enumerate(s.paths) if p in queries])
    sims = s.vectors[q] @ s.vectors.T
    sims[np.arange(len(q)), q] = -np.inf
    top = np.argsort(-sims, axis=1)[:, :10]
    return float((labels[top] == labels[q][:, None]).mean())


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--kinds", default="siamese,autoencoder")
    ap.add_argument("--train-args", default="", help="extra arguments for cbir train, e.g. '--epochs 5'")
    args = ap.parse_args()
    data, work = Path(args.data).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = discover(data).files
    by_class: dict[str, list[str]] = {}
    for f in files:
        by_class.setdefault(f.split("/")[0], []).append(f)
    train_dir = work / "train"
    queries: set[str] = set()
    for _cls, members in sorted(by_class.items()):
        members.sort()
        cut = int(round(0.6 * len(members)))
        for f in members[:cut]:
            dst = train_dir / f
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(data / f, dst)
        queries.update(members[cut:])
    cbir = [sys.executable, "-m", "cbir"]
    rows = []
    for name in ("efficientnet_lite0", "colour_histogram"):
        out = work / f"index-{name}"
        secs = run([*cbir, "index", str(data), "--out", str(out), "--encoder", name, "--rebuild", "-q"])
        rows.append((name, "-", secs, p_at_10(out, queries)))
    for kind in [k for k in args.kinds.split(",") if k]:
        model = work / f"{kind}.pt"
        train_s = run([*cbir, "train", kind, str(train_dir), "--out", str(model), "--split", "80,20,0", "-q",
                       *args.train_args.split()])
        out = work / f"index-{kind}"
        secs = run([*cbir, "index", str(data), "--out", str(out), "--encoder", kind, "--weights", str(model),
                    "--rebuild", "-q"])
        rows.append((kind, f"{train_s:.0f}", secs, p_at_10(out, queries)))
    print(f"\n{len(files)} images, {len(queries)} queries (40% per class by file name), {os.cpu_count()} cores")
    print("| encoder | training s | indexing s | P@10 |")
    print("|---|---|---|---|")
    for name, tr, secs, p in rows:
        print(f"| {name} | {tr} | {secs:.0f} | {p:.4f} |")


if __name__ == "__main__":
    main()
