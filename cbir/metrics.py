"""Ranking and retrieval metrics, written once for bench, search tuning, numeric-mode calibration and training.

A "ranking" is, for each query, the gallery positions ordered best first with the query itself removed;
ties keep the lower position first, so every figure is the same from run to run.
"""

from __future__ import annotations

import numpy as np

SIMS_BUDGET = 1 << 25  # similarities held in memory at once (128 MB of float32)


def rank(queries: np.ndarray, gallery: np.ndarray, query_pos: np.ndarray | None = None,
         depth: int | None = None) -> np.ndarray:
    """[Q, depth] gallery positions by descending inner product, each query's own position (or -1) excluded.

    Computed over blocks of queries so that memory stays bounded however large the gallery.
    """
    query_pos = np.full(len(queries), -1, np.int64) if query_pos is None else np.asarray(query_pos, np.int64)
    n = gallery.shape[0] - (1 if (query_pos >= 0).any() else 0)
    depth = n if depth is None else max(0, min(depth, n))
    block = max(1, SIMS_BUDGET // max(1, gallery.shape[0]))
    out = np.empty((len(queries), depth), np.int64)
    for start in range(0, len(queries), block):
        sims = queries[start:start + block] @ gallery.T
        pos = query_pos[start:start + block]
        mine = np.flatnonzero(pos >= 0)
        sims[mine, pos[mine]] = -np.inf
        out[start:start + block] = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    return out


def drop_self(found: np.ndarray, query_pos: np.ndarray, k: int) -> np.ndarray:
    """Rows of an index's answer (positions, -1 for none) without each query's own position, cut to k."""
    out = np.full((len(found), k), -1, np.int64)
    for i, (q, row) in enumerate(zip(query_pos, found, strict=True)):
        keep = [int(x) for x in row if x != q and x >= 0][:k]
        out[i, : len(keep)] = keep
    return out


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of places that two rankings [Q, k] agree on (as sets per row; -1 marks an empty place)."""
    hits = sum(len(set(x[x >= 0].tolist()) & set(y[y >= 0].tolist())) for x, y in zip(a, b, strict=True))
    return hits / max(1, int((a >= 0).sum()))


def relevance(ranking: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray) -> np.ndarray:
    return g_labels[ranking] == q_labels[:, None]


def precision_at(rel: np.ndarray, k: int) -> np.ndarray:
    """Per-query precision@k (fraction of the first k that are relevant)."""
    return rel[:, :k].mean(axis=1)


def average_precision(rel: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Per-query AP over the full ranking: mean of precision at each relevant position."""
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    prec = hits / ranks
    total = (prec * rel).sum(axis=1)
    return np.divide(total, n_relevant, out=np.zeros(len(rel)), where=n_relevant > 0)


def summarise(rel: np.ndarray, n_relevant: np.ndarray, q_labels: np.ndarray, ks: list[int]) -> dict:
    out: dict = {}
    for k in ks:
        out[f"precision_at_{k}"] = float(precision_at(rel, k).mean())
    p10 = precision_at(rel, 10)
    out["similar_at_10"] = float(rel[:, :10].sum(axis=1).mean())
    out["dissimilar_at_10"] = float(min(10, rel.shape[1]) - rel[:, :10].sum(axis=1).mean())
    out["mAP"] = float(average_precision(rel, n_relevant).mean())
    out["per_class_precision_at_10"] = {str(c): float(p10[q_labels == c].mean()) for c in sorted(set(q_labels))}
    return out
