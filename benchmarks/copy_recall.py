"""Copy recall@1 of indexes through the search API: does an edited copy of an indexed photo find its source first?

    python benchmarks/copy_recall.py --data ../shared/data/animals4 IDX [more indexes] [--sources 60]

The same seeded sample of indexed photos is edited every way in `cbir.edits.EDITS` (resized, recompressed,
cropped, greyscale, rotated, on a canvas, with a text banner, ...); each copy is embedded by the index's own
encoder and searched with `Index.search_vector`, so the index's query expansion (and its database-side
augmentation, which changed its stored rows) is what is measured. This is the other half of "quality" next to
category precision (loo_precision.py): expansion pulls images of one kind together, which helps "more of this
kind" and can hurt "where is the original of this copy".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cbir import Index
from cbir.edits import EDITS
from cbir.images import load_image


def recall(index: Index, data: Path, picks: np.ndarray) -> dict[str, float]:
    paths = list(index.rows().paths)
    hits = dict.fromkeys(EDITS, 0)
    for i in picks:
        im = load_image(data / paths[i])
        vectors = index.encoder.embed([edit(im) for edit in EDITS.values()])
        for name, v in zip(EDITS, vectors, strict=True):
            hits[name] += index.search_vector(v, k=1)[0].path == paths[i]
    return {name: h / len(picks) for name, h in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("indexes", nargs="+")
    ap.add_argument("--data", required=True, help="the folder the indexes were built from")
    ap.add_argument("--sources", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for path in args.indexes:
        index = Index.open(path, device="cpu")
        picks = np.random.default_rng(args.seed).choice(len(index), min(args.sources, len(index)), replace=False)
        rows.append((Path(path).name, index.expansion.describe(), recall(index, Path(args.data), picks)))
    print(f"{args.sources} sources x {len(EDITS)} edits, recall@1 through the search API")
    print("| index | expansion | all edits | worst edit |")
    print("|---|---|---|---|")
    for name, expansion, r in rows:
        worst = min(r, key=r.get)
        print(f"| {name} | {expansion} | {np.mean(list(r.values())):.4f} | {worst} {r[worst]:.2f} |")


if __name__ == "__main__":
    main()
