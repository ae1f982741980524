"""What search index a segment uses and how well it was measured: the plan stored with each segment, and the rules
every approximate index shares (how many lists, how tuning picks the cheapest setting that reaches its target).

A leaf module (faiss, numpy and the core): the search code, the tuning that chooses the plan, the on-disk builder and
`cbir info` all read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from cbir.metrics import drop_self
from cbir.search.kinds import EXACT_UP_TO, IN_MEMORY_RECALL, INDEX_TYPES, ON_DISK_RECALL, ONDISK

__all__ = ["EXACT_UP_TO", "IN_MEMORY_RECALL", "INDEX_TYPES", "ON_DISK_RECALL", "ONDISK", "HeldOut", "SearchPlan",
           "apply_params", "cheapest_reaching", "exact_top", "nlist_for", "search_params"]
HELD_OUT_QUERIES = 500


@dataclass
class SearchPlan:
    """The kind of index, its parameters, and how well it was measured to agree with exact search."""

    type: str = "flat"
    params: dict[str, Any] = field(default_factory=dict)
    recall_at_10: float = 1.0  # measured against exact search; exact search is 1.0 by definition
    queries: int = 0  # held-out sample size the recall was measured on (0: exact, nothing to measure)
    build_s: float = 0.0
    note: str = ""
    requested: str = "auto"  # what the user asked for; --update builds the same kind again

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SearchPlan:
        return cls(**d) if d else cls()

    @property
    def exact(self) -> bool:
        return self.type == "flat"

    def describe(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        text = f"{self.type} {params}".strip()
        if self.queries:
            text += f"  recall@10 {self.recall_at_10:.4f} (measured on {self.queries} held-out queries)"
        else:
            text += "  exact"
        return text + (f"  ({self.note})" if self.note else "")


def nlist_for(n: int, lists_per_sqrt: float) -> int:
    """About `lists_per_sqrt` * sqrt(N) inverted lists, a power of two, with at least 39 training points per list.

    FAISS's guidance is 4-16 sqrt(N): in memory 4 sqrt(N); on disk sqrt(N), so that training and assignment stay
    affordable on a small machine at 10M vectors (a larger nprobe makes up for it)."""
    nlist = 2 ** round(math.log2(max(16.0, lists_per_sqrt * math.sqrt(n))))
    return int(max(16, min(nlist, 65536, 2 ** int(math.log2(max(16, n // 39))))))


def search_params(plan: SearchPlan, selector: faiss.IDSelector | None = None,
                  share: float = 1.0) -> faiss.SearchParameters | None:
    """The plan's run-time knobs (nprobe, efSearch, k_factor) as FAISS search parameters, with an id selector that
    allows `share` of the rows.

    A filter's best 10 lie further out than the unfiltered best 10: a filter keeping 10% of the rows found 0.81 of its
    true top-10 at the tuned nprobe (200k x 256 clustered, nprobe 4). Widening by min(1/share, 1.5/sqrt(share))
    found 0.9993-1.0 at every share from 50% to 2% there and at 1M x 256, at half the time of widening by 1/share at
    10% (0.49 against 1.00 ms: fewer lists to walk; the selector is checked before any distance is computed)."""
    p = plan.params
    share = max(share, 1e-6)
    widen = min(1.0 / share, 1.5 / math.sqrt(share))
    if plan.type in ("ivf", "ivfpq", ONDISK):
        nprobe = min(int(p.get("nlist", 1 << 30)), math.ceil(int(p["nprobe"]) * widen))
        ivf = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        if plan.type != "ivfpq":
            return ivf
        return faiss.IndexRefineSearchParameters(k_factor=float(p["k_factor"]), base_index_params=ivf)
    if plan.type == "hnsw":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=min(4096, math.ceil(int(p["ef_search"]) * widen)))
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def apply_params(inner: faiss.Index, plan: SearchPlan) -> None:
    """Set the plan's knobs on the index itself (for searches without parameters: the GPU copy, tuning)."""
    p = plan.params
    if plan.type in ("ivf", "ivfpq", ONDISK):
        faiss.extract_index_ivf(inner).nprobe = int(p["nprobe"])
    if plan.type == "hnsw":
        faiss.downcast_index(inner).hnsw.efSearch = int(p["ef_search"])
    if plan.type == "ivfpq":
        faiss.downcast_index(inner).k_factor = float(p["k_factor"])


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 262_144) -> np.ndarray:
    """Exact top-k row positions of each query, scanning `vectors` (a memory map is fine) block by block."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_p = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(vectors), block):
        part = np.ascontiguousarray(vectors[start:start + block], dtype=np.float32)
        s, p = faiss.knn(q, part, min(k, len(part)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_p = np.hstack([best_s, s]), np.hstack([best_p, p + start])
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_p = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_p, order, 1)
    return best_p


@dataclass(frozen=True)
class HeldOut:
    """Sample rows of a collection and their exact top-10 (row positions, each row itself left out)."""

    rows: np.ndarray
    queries: np.ndarray
    truth: np.ndarray

    @classmethod
    def sample(cls, vectors: np.ndarray, seed: int, size: int = HELD_OUT_QUERIES) -> HeldOut:
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=min(size, len(vectors)), replace=False))
        queries = np.asarray(vectors[rows], np.float32)
        return cls(rows, queries, drop_self(exact_top(vectors, queries, 11), rows, 10))

    def recall(self, found: np.ndarray) -> float:
        """Share of the exact top-10 in `found` (each query's top-11 positions, its own row to be dropped)."""
        from cbir.metrics import overlap

        return round(overlap(self.truth, drop_self(found, self.rows, 10)), 4)


def cheapest_reaching(settings: Iterable[SearchPlan], recall_of: Callable[[SearchPlan], float],
                      target: float, log: Callable[[str], None]) -> tuple[SearchPlan, bool]:
    """The first plan (cheapest first) whose measured recall reaches `target`; else the last one measured, False."""
    plan = SearchPlan()
    for plan in settings:
        plan.recall_at_10 = recall_of(plan)
        log(f"{plan.type} {plan.params} recall@10 {plan.recall_at_10:.4f}")
        if plan.recall_at_10 >= target:
            return plan, True
    return plan, False
