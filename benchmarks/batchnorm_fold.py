"""What folding batch norms into convolutions is worth: model-only images/s, kept vs folded, in one run.

    python benchmarks/batchnorm_fold.py [--encoders efficientnet_lite0,resnet50:none] [--repeats 5]

Both networks are built by `cbir.encoders.create` (folded is the default; `fold_batchnorm=False` keeps them),
and are timed alternately on the same random batch, so a busy moment of a shared machine hits both; the table
shows medians of the repeats and the largest difference between the two embeddings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from statistics import median

import numpy as np
import torch

from cbir.encoders import create


def rate(enc, x: torch.Tensor, calls: int = 3) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        enc.embed_tensor(x)
    return calls * len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="efficientnet_lite0,resnet50:none")
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, medians of {args.repeats}", file=sys.stderr)
    print("| encoder | batch norms folded | precision | batch | kept img/s | folded img/s | folded / kept "
          "| max abs difference |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.encoders.split(","):
        name, _, weights = spec.partition(":")
        folded = create(name, weights=weights or None, device="cpu")
        kept = create(name, weights=weights or None, device="cpu", fold_batchnorm=False)
        size = folded.preprocess.size
        for precision in ("fp32", "bf16"):
            folded.precision = kept.precision = precision
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
                diff = float(np.abs(kept.embed_tensor(x) - folded.embed_tensor(x)).max())  # also the warm-up
                runs: dict[str, list[float]] = {"kept": [], "folded": []}
                for _ in range(args.repeats):
                    runs["kept"].append(rate(kept, x))
                    runs["folded"].append(rate(folded, x))
                k, f = median(runs["kept"]), median(runs["folded"])
                print(f"| {name} | {folded.folded_batchnorms} | {precision} | {batch} | {k:.1f} | {f:.1f} "
                      f"| {f / k:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
