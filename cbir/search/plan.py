"""What search index an index uses and how well it was measured: the plan stored in the vectors file.

A leaf module (faiss and the standard library only): the search code, the tuning that chooses the plan, and
`cbir info` all read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the command's parser reads INDEX_TYPES without loading faiss
    import faiss

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq")
EXACT_UP_TO = 50_000  # auto: exact search up to this many vectors
TARGET_RECALL = 0.99
ONDISK = "ivfpq-ondisk"  # IVF-PQ with its lists on disk, re-ranked with exact rows (cbir.search.ondisk)


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

    def describe(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        text = f"{self.type} {params}".strip()
        if self.queries:
            text += f"  recall@10 {self.recall_at_10:.4f} (measured on {self.queries} held-out queries)"
        else:
            text += "  exact"
        return text + (f"  ({self.note})" if self.note else "")


def _inner(index: faiss.Index) -> faiss.Index:
    import faiss

    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def apply_params(inner: faiss.Index, plan: SearchPlan) -> None:
    """Set the run-time knobs (nprobe, efSearch, k_factor) that the plan chose."""
    import faiss

    p = plan.params
    if plan.type in ("ivf", "ivfpq", ONDISK):
        faiss.extract_index_ivf(inner).nprobe = int(p["nprobe"])
    if plan.type == "hnsw":
        faiss.downcast_index(inner).hnsw.efSearch = int(p["ef_search"])
    if plan.type == "ivfpq":
        faiss.downcast_index(inner).k_factor = float(p["k_factor"])
