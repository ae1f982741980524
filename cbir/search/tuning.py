"""Which search index to build for a segment held in memory, and approximate ones tuned by measurement: the
cheapest setting whose recall@10 reaches IN_MEMORY_RECALL. `build` is the policy (exact up to 50,000 vectors, then
IVF, then HNSW).

Recall is measured against exact search on a held-out sample of the collection's own vectors (each sample vector is
a query; its own row is left out of both answers), so the figure describes this collection, not a synthetic one. If
no setting worth having reaches the target, the answer is exact search.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from cbir.errors import CbirError
from cbir.search.plan import (
    EXACT_UP_TO,
    IN_MEMORY_RECALL,
    INDEX_TYPES,
    HeldOut,
    SearchPlan,
    apply_params,
    cheapest_reaching,
    nlist_for,
)

log = logging.getLogger(__name__)
LISTS_PER_SQRT = 4  # in memory: about 4 sqrt(N) lists


def build(vectors: np.ndarray, ids: np.ndarray, index_type: str = "flat",
          seed: int = 0) -> tuple[faiss.Index, SearchPlan]:
    """The FAISS index (an IndexIDMap2 answering with `ids`) for these vectors, and its plan.

    auto: exact search up to EXACT_UP_TO vectors; above, IVF tuned to recall@10 >= IN_MEMORY_RECALL, else HNSW,
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
    if plan.exact and index_type == "auto":  # IVF could not reach the target: try a graph
        index, plan = build_approximate("hnsw", vectors, ids, seed=seed)
    if plan.exact:  # nothing approximate reached the target: exact search
        return flat(vectors, ids), SearchPlan("flat", note=plan.note, requested=index_type)
    plan.build_s, plan.requested = round(time.perf_counter() - started, 2), index_type
    return index, plan


def flat(vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Exact inner-product search answering with `ids`: always right, and needs no training."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))
    return index


def pq_subquantizers(d: int) -> int:
    """About d/16 sub-quantizers of 8 bits (16 dims each), a divisor of d."""
    target = max(1, d // 16)
    return max(m for m in range(1, target + 1) if d % m == 0)


def _untrained(kind: str, n: int, d: int) -> tuple[faiss.Index, list[dict], dict]:
    """An empty index of `kind`, the settings to try (cheapest first) and its fixed parameters."""
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 80
        return inner, [{"ef_search": e} for e in (16, 32, 64, 128, 256, 512)], {"M": 32, "ef_construction": 80}
    nlist = nlist_for(n, LISTS_PER_SQRT)
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf":
        inner = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        return inner, [{"nprobe": p} for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist // 8], \
            {"nlist": nlist}
    if kind == "ivfpq":
        m = pq_subquantizers(d)
        inner = faiss.IndexRefineFlat(faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT))
        settings = [{"nprobe": p, "k_factor": kf} for p in (4, 8, 16, 32, 64, 128) if p <= nlist // 8
                    for kf in (4, 8, 16, 32)]  # PQ finds candidates, exact vectors re-rank them
        return inner, settings, {"nlist": nlist, "pq_m": m, "pq_bits": 8}
    raise ValueError(kind)


def build_approximate(kind: str, vectors: np.ndarray, ids: np.ndarray,
                      seed: int = 0) -> tuple[faiss.Index, SearchPlan]:
    """An IndexIDMap2 over a trained and filled `kind` index, with its run-time knobs tuned."""
    n, d = vectors.shape
    log.info(f"search index: {kind} for {n} vectors of dimension {d}; measuring exact neighbours of "
             f"sample vectors")
    held = HeldOut.sample(vectors, seed)
    inner, settings, base = _untrained(kind, n, d)
    if kind != "hnsw":
        rng = np.random.default_rng(seed)
        train = vectors[np.sort(rng.choice(n, size=min(n, 40 * base["nlist"]), replace=False))]
        log.info(f"search index: training {kind} ({base}) on {len(train)} vectors")
        started = time.perf_counter()
        cp = faiss.extract_index_ivf(inner).cp
        cp.seed, cp.niter = seed, 10  # 10 k-means rounds: near-final centroids at 40% of the default cost
        inner.train(train)
        log.info(f"search index: trained in {time.perf_counter() - started:.1f} s")
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, ids)

    def recall_of(plan: SearchPlan) -> float:
        apply_params(inner, plan)
        return held.recall(inner.search(held.queries, 11)[1])

    plans = (SearchPlan(kind, {**base, **setting}, queries=len(held.rows)) for setting in settings)
    plan, reached = cheapest_reaching(plans, recall_of, IN_MEMORY_RECALL,
                                      lambda text: log.info(f"search index: {text}"))
    if reached:
        return index, plan
    return index, SearchPlan("flat", note=f"{kind} did not reach recall@10 {IN_MEMORY_RECALL} at any worthwhile "
                                          "setting; exact search instead")
