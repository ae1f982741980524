"""Neighbours that improve neighbours, with no labels: alpha-query expansion and database-side augmentation.

alpha-QE (search time): the query is replaced by the normalised sum of itself and its top-k neighbours, each
weighted by its cosine to the power alpha. alpha-DBA (index time): every indexed vector is replaced the same way
by itself and its top-k neighbours, so that images of one kind pull together. Defaults are the published ones
(Radenovic, Tolias and Chum, TPAMI 2018: k = 2, alpha = 3), not values searched on one collection. What an index
uses is recorded in its vectors file (attribute `expansion`), like the search plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, k) -> (scores, ids); -1: none
VectorsOf = Callable[[np.ndarray], np.ndarray]  # ids -> their vectors [n, D]
Neighbours = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (rows, first row) -> (scores, vectors)


@dataclass(frozen=True)
class Expansion:
    qe_k: int = 0  # 0: no query expansion
    qe_alpha: float = 3.0
    dba_k: int = 0  # 0: no database-side augmentation
    dba_alpha: float = 3.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Expansion:
        return cls(**d) if d else cls()

    def describe(self) -> str:
        parts = [f"alpha-QE k={self.qe_k} alpha={self.qe_alpha:g}"] if self.qe_k else []
        parts += [f"alpha-DBA k={self.dba_k} alpha={self.dba_alpha:g}"] if self.dba_k else []
        return ", ".join(parts) or "none"


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def combine(base: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float) -> np.ndarray:
    """normalise(base + sum_i max(score_i, 0)^alpha * neighbour_i), row by row ([B, D], [B, k, D], [B, k])."""
    w = np.clip(np.nan_to_num(scores, neginf=0.0), 0.0, None) ** alpha
    return _normalise(base + np.einsum("bk,bkd->bd", w, neighbours))


def expand_queries(queries: np.ndarray, search: Search, vectors_of: VectorsOf, k: int, alpha: float,
                   exclude: list[tuple[int, ...]] | None = None) -> np.ndarray:
    """alpha-QE: each query [B, D] with its top-k neighbours (ids in `exclude[i]` left out), as searched. The one
    expansion: search uses it, and the confidence words are fitted through it (so they describe what search shows)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exclude = exclude or [()] * len(queries)
    extra = max((len(e) for e in exclude), default=0)
    scores, ids = search(queries, k + extra)
    picked_s = np.zeros((len(queries), k), np.float32)
    picked = np.full((len(queries), k), -1, np.int64)
    for row, (s, found) in enumerate(zip(scores, ids, strict=True)):
        keep = [(float(a), int(b)) for a, b in zip(s, found, strict=True) if b >= 0 and b not in exclude[row]][:k]
        for j, (score, id_) in enumerate(keep):
            picked_s[row, j], picked[row, j] = score, id_
    vectors = np.zeros((*picked.shape, queries.shape[1]), np.float32)
    valid = picked >= 0
    if valid.any():
        vectors[valid] = vectors_of(picked[valid])
    return combine(queries, vectors, picked_s, alpha)


def augment_database(vectors: np.ndarray, neighbours: Neighbours, alpha: float, block: int = 1024) -> np.ndarray:
    """alpha-DBA: each row with its top neighbours; `neighbours(rows, start)` gives their scores [B, k] and vectors
    [B, k, D] (each row itself excluded), rows being vectors[start:start + B]."""
    out = np.empty_like(vectors, dtype=np.float32)
    for start in range(0, len(vectors), block):
        rows = np.asarray(vectors[start:start + block], np.float32)
        scores, found = neighbours(rows, start)
        out[start:start + len(rows)] = combine(rows, found, scores, alpha)
    return out


def without_self(scores: np.ndarray, positions: np.ndarray, start: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (score, position) from a search of rows start.. against themselves, its own row left out."""
    own = np.arange(start, start + len(positions))[:, None]
    keep = np.argsort(positions == own, axis=1, kind="stable")[:, :k]  # own row last, then cut
    s, p = np.take_along_axis(scores, keep, 1), np.take_along_axis(positions, keep, 1)
    return np.where(p >= 0, s, -np.inf), p
