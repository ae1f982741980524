"""Copy recall@1 of indexes through the search API: does an edited copy of an indexed photo find its source first?

    python benchmarks/copy_recall.py --data ../shared/data/animals4 IDX [more indexes] [--sources 60]
    python benchmarks/copy_recall.py --data ../shared/data/animals4 IDX --copies --sources 42 --held-out 100

The same seeded sample of indexed photos is edited every way in `cbir.edits.EDITS` (resized, recompressed,
cropped, greyscale, rotated, on a canvas, with a text banner, ...); each copy is embedded by the index's own
encoder and searched with `Index.search_vector`, so the index's query expansion (and its database-side
augmentation, which changed its stored rows) is what is measured. This is the other half of "quality" next to
category precision (loo_precision.py): expansion pulls images of one kind together, which helps "more of this
kind" and can hurt "where is the original of this copy".

`--copies` also puts each copy through `cbir.copies.rank_copies_first` exactly as `cbir search --copies` does
(embedding, global search, local-feature verification of the candidates), one query at a time in this process,
and reports recall@1 with verified copies first beside the milliseconds per query (p50 / p95; one warm-up query
first, so the query model's loading is not counted). There the first result is right when it is the source, a
byte-identical file or a verified copy of the source, as `cbir bench --task copies` counts (animals4 holds one
monkey selfie five times). `--held-out N` adds N photos of `--data` that the index does
not hold (no copy of them is indexed): how long a query with nothing to find takes, and how often a picture is
wrongly marked as a copy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cbir import Index
from cbir.edits import EDITS
from cbir.images import discover, load_image


def recall(index: Index, data: Path, picks: np.ndarray) -> dict[str, float]:
    paths, _ = content_of(index)
    hits = dict.fromkeys(EDITS, 0)
    for i in picks:
        im = load_image(data / paths[i])
        vectors = index.encoder.embed([edit(im) for edit in EDITS.values()])
        for name, v in zip(EDITS, vectors, strict=True):
            hits[name] += index.search_vector(v, k=1)[0].path == paths[i]
    return {name: h / len(picks) for name, h in hits.items()}


def verified(index: Index, data: Path, picks: np.ndarray, held_out: list[str]) -> dict[str, object]:
    """Recall@1 with verified copies first, and per-query milliseconds, through `rank_copies_first`."""
    from cbir.copies import rank_copies_first

    paths, hashes = content_of(index)
    same = SamePicture(index, hashes)
    rank_copies_first(index, load_image(data / paths[picks[0]]))  # warm-up: the query model and OpenCV load
    hits, ms, negatives, false_copies = [], [], [], 0
    for i in picks:
        im = load_image(data / paths[i])
        for edit in EDITS.values():
            query = edit(im)
            started = time.perf_counter()
            ranked = rank_copies_first(index, query, k=10)
            ms.append((time.perf_counter() - started) * 1000)
            hits.append(same(ranked[0][0].path, paths[i]))
    for rel in held_out:
        query = load_image(data / rel)
        started = time.perf_counter()
        ranked = rank_copies_first(index, query, k=10)
        negatives.append((time.perf_counter() - started) * 1000)
        false_copies += any(e.verified for _, e in ranked)
    return {"recall": float(np.mean(hits)), "queries": len(hits), "ms": np.array(ms), "negatives": np.array(negatives),
            "false_copies": false_copies}


def content_of(index: Index) -> tuple[list[str], dict[str, str]]:
    """Every indexed path (in row order) and its content hash (`store` is an index's columns before segments: this
    script runs against an older checkout too, for the before-and-after figures)."""
    rows = index.rows() if hasattr(index, "rows") else index.store  # type: ignore[attr-defined]
    paths = list(rows.paths)
    return paths, dict(zip(paths, rows.sha256 or [""] * len(paths), strict=True))


class SamePicture:
    """The right answer to a copy, as `cbir bench --task copies` counts it: the source, a byte-identical file, or a
    file verified as a copy of the source (animals4 holds one monkey selfie five times, re-encoded)."""

    def __init__(self, index: Index, hashes: dict[str, str]) -> None:
        from cbir.copies import FeatureCache

        self.index, self.hashes, self.cache = index, hashes, FeatureCache()

    def __call__(self, found: str, source: str) -> bool:
        if found == source or self.hashes.get(found, "") == self.hashes.get(source) != "":
            return True
        root = self.index.root
        return self.cache.compare(root / source, root / found).verified


def held_out_photos(index: Index, data: Path, n: int, seed: int) -> list[str]:
    indexed = set(content_of(index)[0])
    others = [f for f in discover(data).files if f not in indexed]
    if not n or not others:
        return []
    return [others[i] for i in sorted(np.random.default_rng(seed).choice(len(others), min(n, len(others)),
                                                                         replace=False))]


def _print_verified(name: str, v: dict[str, object]) -> None:
    ms, neg = v["ms"], v["negatives"]
    assert isinstance(ms, np.ndarray) and isinstance(neg, np.ndarray)
    print(f"\n{name}: {v['queries']} edited copies through rank_copies_first (one process, one query at a time)")
    print("| recall@1, verified first | ms per query p50 | p95 | held-out queries | their p50 / p95 ms | "
          "marked as copies |")
    print("|---|---|---|---|---|---|")
    held = f"{np.percentile(neg, 50):.0f} / {np.percentile(neg, 95):.0f}" if len(neg) else "-"
    print(f"| {v['recall']:.4f} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 95):.0f} | {len(neg)} | {held} | "
          f"{v['false_copies']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("indexes", nargs="+")
    ap.add_argument("--data", required=True, help="the folder the indexes were built from")
    ap.add_argument("--sources", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copies", action="store_true", help="also time rank_copies_first (verified copies first)")
    ap.add_argument("--held-out", type=int, default=0, help="with --copies: this many photos the index lacks")
    args = ap.parse_args()
    rows, timed = [], []
    for path in args.indexes:
        index = Index.open(path, device="cpu")
        picks = np.random.default_rng(args.seed).choice(len(index), min(args.sources, len(index)), replace=False)
        if args.copies:
            held_out = held_out_photos(index, Path(args.data), args.held_out, args.seed)
            timed.append((Path(path).name, verified(index, Path(args.data), picks, held_out)))
        rows.append((Path(path).name, index.expansion.describe(), recall(index, Path(args.data), picks)))
    print(f"{args.sources} sources x {len(EDITS)} edits, recall@1 through the search API")
    print("| index | expansion | all edits | worst edit |")
    print("|---|---|---|---|")
    for name, expansion, r in rows:
        worst = min(r, key=r.get)
        print(f"| {name} | {expansion} | {np.mean(list(r.values())):.4f} | {worst} {r[worst]:.2f} |")
    for name, v in timed:
        _print_verified(name, v)


if __name__ == "__main__":
    main()
