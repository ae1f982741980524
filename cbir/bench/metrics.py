"""Retrieval metrics on ranked lists: precision@k, similar/dissimilar at 10, average precision.

A "ranking" is, for each query, the gallery items ordered best first with the query itself removed.
"""

from __future__ import annotations

import numpy as np


def rank(queries: np.ndarray, gallery: np.ndarray, query_pos: np.ndarray, depth: int | None = None) -> np.ndarray:
    """[Q, depth] gallery positions by descending cosine, excluding each query's own position (or -1)."""
    sims = queries @ gallery.T
    valid = query_pos >= 0
    sims[np.flatnonzero(valid), query_pos[valid]] = -np.inf
    n = gallery.shape[0] - (1 if valid.any() else 0)
    depth = n if depth is None else min(depth, n)
    # stable order on ties (lower position first) so results are deterministic
    order = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    return order


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
