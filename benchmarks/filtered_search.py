"""Filtered search at 1,000,000 rows: p50 latency and recall@10 when 50%, 10%, 1% and 0.01% of the rows match.

    python benchmarks/filtered_search.py [--rows 1000000] [--dim 256] [--queries 300] [--work /tmp/cbir-filtered]

An index of synthetic rows with metadata is written through the product's segment writer (one segment, IVF tuned to
recall@10 >= 0.99 unfiltered, as `cbir index` builds it; reused by later runs from --work): clustered vectors
(benchmarks/scale.py's generator) and, drawn independently of them, a date taken (uniform over 2015-2024), one of
ten cameras, one of 100 folders, and a tag on exactly 0.01% of the rows. Each level is a filter of another kind, so
every mask path is timed: a date range (50%), a camera (10%), a folder (1%), a tag (0.01%).

Queries are fresh vectors of the same distribution, searched through `Index.search_vector(v, k=10, where=...)` one at
a time, unfiltered and at every level in turn for each query (paired: the machine's noise hits all alike). "cold"
makes the filter's row mask anew for every query (the first query of a new filter); "warm" reuses it (the next page,
the next query within the same filter: masks are kept per segment). Recall@10 is against an exact search of the
matching rows alone. The ratio is the warm p50 over the unfiltered p50 measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import Generator  # noqa: E402

from cbir import metadata  # noqa: E402
from cbir.search.filters import Where  # noqa: E402

CAMERAS = [("Google", f"Pixel {n}") for n in range(4, 9)] + [("Canon", f"Canon EOS R{n}") for n in range(1, 6)]
FOLDERS = 100
RARE = "rare"
START, END = datetime(2015, 1, 1), datetime(2025, 1, 1)
LEVELS = [  # share of rows, the filter
    ("50%", Where.parse(after="2020-01-01")),
    ("10%", Where.parse(camera="Pixel 7")),
    ("1%", Where.parse(folder="f042")),
    ("0.01%", Where.parse(tags=[RARE])),
]


def _meta(start: int, stop: int, rare: set[int]) -> dict[str, np.ndarray]:
    """Rows' metadata, drawn from the row number (the same whatever the block size)."""
    rng = np.random.default_rng([7, start])
    n = stop - start
    first, last = metadata.wall_clock_ns(START), metadata.wall_clock_ns(END)
    cams = rng.integers(0, len(CAMERAS), n)
    metas = [metadata.Meta(taken_ns=int(t), taken_exif=True, make=CAMERAS[c][0], model=CAMERAS[c][1],
                           width=4000, height=3000, tags=(RARE,) if start + j in rare else ())
             for j, (t, c) in enumerate(zip(rng.integers(first, last, n), cams, strict=True))]
    return metadata.to_columns(metas)


def build(work: Path, rows: int, dim: int) -> None:
    """The index: one segment written by the product's writer, IVF chosen and tuned as for any collection."""
    from cbir.search.manifest import Manifest, Settings
    from cbir.search.writer import IndexWriter, RowBlock

    work.mkdir(parents=True, exist_ok=True)
    gen = Generator(dim)
    config = {"name": "synthetic", "dim": dim, "pooling": "none", "weights": {"source": "none", "sha256": ""}}
    writer = IndexWriter(work, Manifest(generation=0, settings=Settings(encoder=config, root=str(work))))
    ids = writer.new_ids(rows)
    rare = set(np.random.default_rng(11).choice(rows, size=max(1, rows // 10_000), replace=False).tolist())
    folder_of = np.random.default_rng(13).integers(0, FOLDERS, rows)
    block = 50_000

    def blocks():
        for a in range(0, rows, block):
            b = min(rows, a + block)
            yield RowBlock(ids=ids[a:b], paths=[f"f{folder_of[i]:03d}/{i:09d}.jpg" for i in range(a, b)],
                           vectors=gen.rows(a, b), mtime_ns=np.zeros(b - a, np.int64), size=np.zeros(b - a, np.int64),
                           sha256=[""] * (b - a), meta=_meta(a, b, rare))
            print(f"written {b:,} of {rows:,} rows", file=sys.stderr, flush=True)

    started = time.perf_counter()
    writer.add_segment(rows, blocks())
    writer.commit(created="benchmark")
    print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def measure(work: Path, dim: int, queries: int) -> None:
    from cbir import Index

    index = Index.open(work, device="cpu")
    segment = index.generation.segments[0]
    x = np.asarray(segment.store.vectors)
    q = Generator(dim).rows(0, queries, stream=99)
    truth, matching, route = {}, {}, {}
    for name, where in LEVELS:
        rows = np.flatnonzero(segment.columns().mask(where))
        matching[name] = len(rows)
        sims = q @ x[rows].T
        top = np.argsort(-sims, axis=1)[:, :10]
        truth[name] = [set(segment.store.ids[rows[t]].tolist()) for t in top]
        route[name] = "exact scan of the matching rows" if len(rows) <= _scan_limit() else \
            f"IVF + id selector ({segment.search.plan.describe().split('  recall')[0]})"
    times: dict[str, dict[str, list[float]]] = {n: {"cold": [], "warm": []} for n, _ in [("all", None), *LEVELS]}
    recall: dict[str, list[float]] = {n: [] for n, _ in LEVELS}
    for i in range(queries):
        times["all"]["warm"].append(_timed(lambda v=q[i]: index.search_vector(v, k=10)))
        for name, where in LEVELS[i % len(LEVELS):] + LEVELS[: i % len(LEVELS)]:  # rotating order
            segment.columns()._masks.clear()
            times[name]["cold"].append(_timed(lambda v=q[i], w=where: index.search_vector(v, k=10, where=w)))
            found = index.search_vector(q[i], k=10, where=where)
            times[name]["warm"].append(_timed(lambda v=q[i], w=where: index.search_vector(v, k=10, where=w)))
            recall[name].append(len({r.id for r in found} & truth[name][i]) / min(10, matching[name]))
    _table(index, times, recall, matching, route)


def _scan_limit() -> int:
    from cbir.search.searcher import SCAN_AT_MOST

    return SCAN_AT_MOST


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def _table(index, times, recall, matching, route) -> None:
    base = statistics.median(times["all"]["warm"])
    print(f"\n{len(index):,} rows x {index.generation.dim}, {len(times['all']['warm'])} queries, "
          f"{os.cpu_count()} cores; unfiltered p50 {base:.2f} ms")
    print("| rows matching | filter | matching | searched by | p50 ms (cold mask) | p50 ms (warm) | warm / unfiltered "
          "| recall@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, where in LEVELS:
        cold, warm = statistics.median(times[name]["cold"]), statistics.median(times[name]["warm"])
        print(f"| {name} | `{where.describe()}` | {matching[name]:,} | {route[name]} | {cold:.2f} | {warm:.2f} "
              f"| {warm / base:.2f}x | {np.mean(recall[name]):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cbir-filtered"))
    args = ap.parse_args()
    work = args.work / f"{args.rows}x{args.dim}"
    if not (work / "manifest.json").is_file():
        build(work, args.rows, args.dim)
        gc.collect()
    measure(work, args.dim, args.queries)


if __name__ == "__main__":
    main()
