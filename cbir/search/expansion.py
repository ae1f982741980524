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

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, k) -> (scores, positions)


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


def augment_database(vectors: np.ndarray, search: Search, k: int, alpha: float, block: int = 1024) -> np.ndarray:
    """alpha-DBA: each row with its own top-k neighbours (itself excluded; `search` answers in row positions)."""
    out = np.empty_like(vectors, dtype=np.float32)
    for start in range(0, len(vectors), block):
        rows = vectors[start:start + block].astype(np.float32)
        scores, pos = search(rows, k + 1)
        own = np.arange(start, start + len(rows))[:, None]
        keep = np.argsort(pos == own, axis=1, kind="stable")[:, :k]  # own row last, then cut
        s, p = np.take_along_axis(scores, keep, 1), np.take_along_axis(pos, keep, 1)
        s = np.where(p >= 0, s, 0.0)
        out[start:start + len(rows)] = combine(rows, vectors[np.clip(p, 0, None)].astype(np.float32), s, alpha)
    return out
