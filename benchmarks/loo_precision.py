"""Leave-one-out precision@k of an index, straight from its vectors.h5 (label = first folder of the path).

    cbir index ../shared/data/animals4 --out indexes/animals4
    python benchmarks/loo_precision.py indexes/animals4 -k 10
"""

from __future__ import annotations

import argparse

import numpy as np

from cbir import store
from cbir.layout import VECTORS, resolve_index_dir


def loo_precision(vectors: np.ndarray, labels: np.ndarray, k: int) -> float:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    return float((labels[top] == labels[:, None]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index")
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args()
    s = store.read(resolve_index_dir(args.index) / VECTORS)
    labels = np.array([path.split("/")[0] for path in s.paths])
    print(f"| index | images | classes | encoder | indexing s | LOO P@{args.k} |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.index} | {len(s)} | {len(set(labels))} | {s.attrs['encoder']} | "
          f"{float(s.attrs.get('seconds', 0)):.1f} | {loo_precision(s.vectors, labels, args.k):.4f} |")


if __name__ == "__main__":
    main()
