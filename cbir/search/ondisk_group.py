"""On-disk segments that share a trained index, searched as one index over all their rows.

An update of an on-disk index adds a segment encoded with the first segment's trained index (the same OPQ rotation,
coarse centroids and PQ codebooks). Searched one by one, every such segment ran the rotation and the coarse quantizer
again and re-ranked its own candidates: ~0.5 ms a segment, so that after 20 updates of 10,000 rows (7 segments once
merged) a query on the 10M index took 7.5 ms against 2.4 ms fresh (benchmarks/scale.py). Here the rotation and the
quantizer run once, each segment's inverted lists are scanned with those assignments (FAISS's search_preassigned),
and the best k * k_factor PQ candidates over all of them are re-ranked with the stored vectors: what one index built
from all the rows would do, since the codes are the same.
"""

from __future__ import annotations

import math
from typing import Protocol

import faiss
import numpy as np

from cbir.search.plan import ONDISK
from cbir.search.searcher import FEW_QUERIES, Allowed, VectorSearch, rerank, threads
from cbir.search.store import Store


class Segment(Protocol):
    """What is read of a segment (cbir.search.segments.Segment, which imports this module)."""

    search: VectorSearch
    store: Store
    live: Allowed | None

    def __len__(self) -> int: ...


def groups(segments: list[Segment]) -> list[list[int]]:
    """Positions of the on-disk segments that share a trained index, in groups of two or more."""
    by_trained: dict[str, list[int]] = {}
    for n, seg in enumerate(segments):
        plan = seg.search.plan
        if plan.type == ONDISK and plan.params.get("trained") and seg.search.exact_rows is not None:
            by_trained.setdefault(str(plan.params["trained"]), []).append(n)
    return [g for g in by_trained.values() if len(g) > 1]


def find(segments: list[Segment], q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each [B, k], over the live rows of `segments` (on-disk, one trained index)."""
    live = [s.live for s in segments]
    if sum(len(s) for s in segments) == 0:
        return _reranked(segments, q, k, 0, [])
    first = segments[0].search
    candidates = k * int(first.plan.params.get("k_factor", 1))
    nprobe = _nprobe(segments)
    with threads(1 if len(q) <= FEW_QUERIES else 0):
        xt = _rotated(first.faiss_index, q)
        coarse_scores, lists = faiss.downcast_index(first.faiss_index.index).quantizer.search(xt, nprobe)
        found = []
        for n, (seg, allowed) in enumerate(zip(segments, live, strict=True)):
            if allowed is not None and allowed.count == 0:
                continue
            search = faiss.SearchParametersIVF(sel=allowed.selector() if allowed is not None else None, nprobe=nprobe)
            d, rows = _preassigned(faiss.downcast_index(seg.search.faiss_index.index), xt,
                                   min(candidates, seg.search.ntotal), lists, coarse_scores, search)
            found.append((np.where(rows >= 0, d, -np.inf), rows, n))
    return _reranked(segments, q, k, candidates, found)


def _preassigned(ivf: faiss.IndexIVF, x: np.ndarray, k: int, lists: np.ndarray, coarse: np.ndarray,
                 params: faiss.SearchParametersIVF) -> tuple[np.ndarray, np.ndarray]:
    """IndexIVF.search_preassigned with search parameters (the Python wrapper refuses them; the C++ method takes
    them: the id selector of the live rows, nprobe)."""
    d = np.empty((len(x), k), np.float32)
    rows = np.empty((len(x), k), np.int64)
    lists = np.ascontiguousarray(lists, np.int64)
    coarse = np.ascontiguousarray(coarse, np.float32)
    ivf.search_preassigned_c(len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
                             faiss.swig_ptr(d), faiss.swig_ptr(rows), False, params)
    return d, rows


def _nprobe(segments: list[Segment]) -> int:
    """The plan's nprobe, widened as a filtered search widens it for the share of rows still live."""
    p = segments[0].search.plan.params
    share = max(sum(len(s) for s in segments) / max(1, sum(s.search.ntotal for s in segments)), 1e-6)
    widen = 1.0 if share >= 1.0 else min(1.0 / share, 1.5 / math.sqrt(share))
    return max(1, min(int(p.get("nlist", 1 << 30)), math.ceil(int(p["nprobe"]) * widen)))


def _rotated(index: faiss.Index, q: np.ndarray) -> np.ndarray:
    """The queries through the index's pre-transforms (the OPQ rotation), once for every segment."""
    x = np.ascontiguousarray(q, dtype=np.float32)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
    return x


def _reranked(segments: list[Segment], q: np.ndarray, k: int, candidates: int,
              found: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The best `candidates` PQ answers over all segments, re-ranked with the stored vectors (searcher.rerank, each
    segment's share of them); the top k."""
    scores = [np.full((len(q), k), -np.inf, np.float32)]
    ids = [np.full((len(q), k), -1, np.int64)]
    if found:
        best = np.argsort(-np.hstack([f[0] for f in found]), axis=1, kind="stable")[:, :candidates]
        rows = np.take_along_axis(np.hstack([f[1] for f in found]), best, 1)
        seg = np.take_along_axis(np.hstack([np.full(f[1].shape, f[2]) for f in found]), best, 1)
        for n in sorted(set(seg[rows >= 0].tolist())):
            s, r = rerank(q, np.where(seg == n, rows, -1), segments[n].search.exact_rows, k)
            scores.append(s)
            ids.append(np.where(r >= 0, segments[n].store.ids_at(np.clip(r, 0, None)), -1))
    s, i = np.hstack(scores), np.hstack(ids)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
