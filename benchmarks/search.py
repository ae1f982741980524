"""Search at scale: build time, memory per vector, single-query p50/p99, batch QPS and recall@10 per index type.

    python benchmarks/search.py                                   # 100k and 1M, dimensions 1280 and 2048
    python benchmarks/search.py --sizes 100000 --dims 1280 --types flat,ivf

Vectors come from a clustered distribution (a two-level mixture of Gaussians: 200 topics, 25 clusters around
each, points around the clusters, L2-normalised), like real embeddings and unlike iid noise, on which no
approximate index works. Each index is
built by cbir's own `tuning.build` (so approximate kinds are tuned on the collection's own vectors to
recall@10 >= 0.99), then measured with *other* queries from the same distribution: recall@10 here is against
exact search on those fresh queries. A second table compares numpy and faiss for exact search per batch size.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import faiss
import numpy as np

from cbir.search import tuning
from cbir.search.searcher import VectorSearch, exact_numpy

CLUSTERS, TOPICS, SPREAD = 5000, 200, 1.0


def centres_of(d: int) -> np.ndarray:
    """Two levels, like image embeddings: 200 topics, each with 25 cluster centres spread around it."""
    rng = np.random.default_rng(1)
    topics = rng.normal(size=(TOPICS, d)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    centres = topics[np.arange(CLUSTERS) % TOPICS] + rng.normal(scale=0.8 / np.sqrt(d), size=(CLUSTERS, d))
    return (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, seed: int, spread: float = SPREAD) -> np.ndarray:
    """n unit vectors: a cluster centre + Gaussian noise of norm ~spread, in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = centres_of(d)
    clusters = len(centres)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        block = centres[rng.integers(0, clusters, m)]
        block += rng.normal(scale=spread / np.sqrt(d), size=(m, d)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + m] = block
    return out


def single_query_ms(vs: VectorSearch, q: np.ndarray, repeats: int) -> tuple[float, float]:
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        vs.search(q[i % len(q)], 10)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def recall(vs: VectorSearch, q: np.ndarray, truth: np.ndarray) -> float:
    _, got = vs.search(q, 10)
    return float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got.tolist(), truth.tolist(), strict=True)]))


def exact_table(x: np.ndarray, q: np.ndarray) -> None:
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    print(f"\nexact search, {len(x)} x {x.shape[1]}: milliseconds per batch (median of 5)")
    print("| batch | numpy | faiss IndexFlatIP |")
    print("|---|---|---|")
    for b in (1, 4, 8, 16, 64):
        rows = []
        for fn in (lambda qq: exact_numpy(x, qq, 10), lambda qq: flat.search(qq, 10)):
            ts = []
            for r in range(5):
                qq = q[r * b:(r + 1) * b]
                t = time.perf_counter()
                fn(qq)
                ts.append((time.perf_counter() - t) * 1000)
            rows.append(float(np.median(ts)))
        print(f"| {b} | {rows[0]:.1f} | {rows[1]:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dims", default="1280,2048")
    ap.add_argument("--types", default="flat,ivf,hnsw,ivfpq")
    ap.add_argument("--hnsw-max", type=int, default=200_000, help="skip HNSW above this size (slow to build)")
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads",
          file=sys.stderr)
    rows = []
    for d in [int(v) for v in args.dims.split(",")]:
        for n in [int(v) for v in args.sizes.split(",")]:
            t = time.perf_counter()
            x = clustered(n, d, seed=3)
            q = _queries_like(d, args.queries)
            _, truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
            print(f"data {n} x {d}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            if n == min(int(v) for v in args.sizes.split(",")):
                exact_table(x, q)
            for kind in args.types.split(","):
                if kind == "hnsw" and n > args.hnsw_max:
                    continue
                t = time.perf_counter()
                vs = VectorSearch(*tuning.build(x, np.arange(n, dtype=np.int64), index_type=kind))
                build = time.perf_counter() - t
                tmp = f"/tmp/cbir-search-bench-{os.getpid()}.index"  # a file, not a second copy in memory
                faiss.write_index(vs.index, tmp)
                size = os.path.getsize(tmp)
                os.unlink(tmp)
                p50, p99 = single_query_ms(vs, q, 50 if vs.exact and n * d > 2e8 else 300)
                t = time.perf_counter()
                vs.search(q, 10)
                qps = len(q) / (time.perf_counter() - t)
                rec = recall(vs, q, truth)
                plan = vs.plan.describe().split("  recall")[0]
                rows.append((n, d, kind, plan, build, size / n, p50, p99, qps, rec))
                print(f"| {n} | {d} | {kind} | {plan} | {build:.1f} | {size / n:.0f} | {p50:.2f} | {p99:.2f} "
                      f"| {qps:.0f} | {rec:.4f} |", file=sys.stderr, flush=True)
                del vs
                gc.collect()
            del x
            gc.collect()
    print("\n| vectors | dim | asked | built (tuned) | build s | bytes/vector | 1-query p50 ms | p99 ms "
          "| batch QPS | recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, d, kind, plan, build, bpv, p50, p99, qps, rec in rows:
        print(f"| {n} | {d} | {kind} | {plan} | {build:.1f} | {bpv:.0f} | {p50:.2f} | {p99:.2f} | {qps:.0f} "
              f"| {rec:.4f} |")


def _queries_like(d: int, m: int) -> np.ndarray:
    """Fresh points from the collection's distribution: the same centres, other noise."""
    return clustered(m, d, seed=99)


if __name__ == "__main__":
    main()
