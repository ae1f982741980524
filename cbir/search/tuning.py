"""Which search index to build, and approximate ones tuned by measurement: the cheapest setting whose
recall@10 reaches the target. `build` is the policy (exact up to 50,000 vectors, then IVF, then HNSW).

Recall is measured against exact search on a held-out sample of the collection's own vectors (each sample
vector is a query; its own row is left out of both answers), so the figure describes this collection, not
a synthetic one. If no setting worth having reaches the target, the answer is exact search.
"""

from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np

from cbir.errors import CbirError
from cbir.metrics import drop_self, overlap
from cbir.search.plan import EXACT_UP_TO, INDEX_TYPES, TARGET_RECALL, SearchPlan, apply_params

SAMPLE_QUERIES = 500
log = logging.getLogger(__name__)


def build(vectors: np.ndarray, ids: np.ndarray, index_type: str = "flat",
          seed: int = 0) -> tuple[faiss.Index, SearchPlan]:
    """The FAISS index (an IndexIDMap2 answering with `ids`) for these vectors, and its plan.

    auto: exact search up to EXACT_UP_TO vectors; above, IVF tuned to recall@10 >= TARGET_RECALL, else HNSW,
    else exact. An approximate kind asked for explicitly falls back to exact only when it cannot reach the target.
    """
    if index_type not in INDEX_TYPES:
        raise CbirError(f"unknown index type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    kind = ("flat" if len(vectors) <= EXACT_UP_TO else "ivf") if index_type == "auto" else index_type
    if kind != "flat" and len(vectors) < 1000:
        return flat(vectors, ids), SearchPlan("flat", note=f"{kind} needs at least 1000 vectors; exact",
                                              requested=index_type)
    if kind == "flat":
        return flat(vectors, ids), SearchPlan("flat", requested=index_type)
    started = time.perf_counter()
    index, plan = build_approximate(kind, vectors, ids, seed=seed)
    if plan.type == "flat" and index_type == "auto":  # IVF could not reach the target: try a graph
        index, plan = build_approximate("hnsw", vectors, ids, seed=seed)
    if plan.type == "flat":  # nothing approximate reached the target: exact search
        return flat(vectors, ids), SearchPlan("flat", note=plan.note, requested=index_type)
    plan.build_s, plan.requested = round(time.perf_counter() - started, 2), index_type
    return index, plan


def flat(vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Exact inner-product search answering with `ids`: always right, and needs no training."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))
    return index


def default_nlist(n: int) -> int:
    """About 4*sqrt(N) lists (a power of two), with at least 39 training points per list."""
    nlist = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(n))))
    return int(max(16, min(nlist, 65536, 2 ** int(math.log2(max(16, n // 39))))))


def pq_subquantizers(d: int) -> int:
    """About d/16 sub-quantizers of 8 bits (16 dims each), a divisor of d."""
    target = max(1, d // 16)
    return max(m for m in range(1, target + 1) if d % m == 0)


def held_out(vectors: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample rows and their exact top-10 (positions), the row itself excluded."""
    n = len(vectors)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(SAMPLE_QUERIES, n), replace=False))
    _, pos = faiss.knn(vectors[rows], vectors, 11, metric=faiss.METRIC_INNER_PRODUCT)  # no copy of the vectors
    return rows, drop_self(pos, rows, 10)


def recall_at_10(index: faiss.Index, vectors: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-10 (`truth`) that `index` finds for the held-out rows."""
    _, pos = index.search(vectors[rows], 11)
    return overlap(truth, drop_self(pos, rows, 10))


def build_approximate(kind: str, vectors: np.ndarray, ids: np.ndarray,
                      seed: int = 0) -> tuple[faiss.Index, SearchPlan]:
    """An IndexIDMap2 over a trained and filled `kind` index, with its run-time knobs tuned."""
    n, d = vectors.shape
    rng = np.random.default_rng(seed)
    log.info(f"search index: {kind} for {n} vectors of dimension {d}; measuring exact neighbours of "
                   f"{min(SAMPLE_QUERIES, n)} sample vectors")
    rows, truth = held_out(vectors, seed)
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 80
        settings = [{"ef_search": e} for e in (16, 32, 64, 128, 256, 512)]
        base = {"M": 32, "ef_construction": 80}
    else:
        nlist = default_nlist(n)
        train = vectors[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))]
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            inner = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            settings = [{"nprobe": p} for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist // 8]
            base = {"nlist": nlist}
        elif kind == "ivfpq":
            m = pq_subquantizers(d)
            pq = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            inner = faiss.IndexRefineFlat(pq)  # PQ finds candidates, exact vectors re-rank them
            settings = [{"nprobe": p, "k_factor": kf} for p in (4, 8, 16, 32, 64, 128) if p <= nlist // 8
                        for kf in (4, 8, 16, 32)]
            base = {"nlist": nlist, "pq_m": m, "pq_bits": 8}
        else:
            raise ValueError(kind)
        log.info(f"search index: training {kind} ({base}) on {len(train)} vectors")
        started = time.perf_counter()
        cp = faiss.extract_index_ivf(inner).cp
        cp.seed, cp.niter = seed, 10  # 10 k-means rounds: near-final centroids at 40% of the default cost
        inner.train(train)
        log.info(f"search index: trained in {time.perf_counter() - started:.1f} s")
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, ids)
    for setting in settings:
        plan = SearchPlan(kind, {**base, **setting})
        apply_params(inner, plan)
        rec = recall_at_10(inner, vectors, rows, truth)
        log.info(f"search index: {setting} recall@10 {rec:.4f}")
        if rec >= TARGET_RECALL:
            plan.recall_at_10, plan.queries = round(rec, 4), len(rows)
            return index, plan
    return index, SearchPlan("flat", note=f"{kind} did not reach recall@10 {TARGET_RECALL} at any worthwhile "
                                          "setting; exact search instead")
