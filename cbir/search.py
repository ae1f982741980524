"""Vector search over an index's vectors: exact up to 50k vectors, approximate (tuned, measured) above.

On disk the FAISS index is an IndexIDMap2 over an inner index, so it answers with the stable ids of
`vectors.h5`. The inner index is searched directly (cloned to the GPU when a GPU build of faiss sees a GPU)
and positions are mapped to ids here. Exact search of a few queries on the CPU runs as one numpy matrix
product over faiss's own storage (no copy): on these CPUs it beat IndexFlatIP by 2x for one query and
by 1.1-8x up to 16 queries at 100k x 1280 and x 2048, while at 64 queries faiss won at 2048 dimensions
(benchmarks/search.py). So numpy answers batches up to 32 queries, faiss larger ones.

What was chosen, and the recall@10 measured against exact search on a held-out sample of the collection's
own vectors, is a `SearchPlan`, stored in the vectors file and shown by `cbir info`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cbir.errors import CbirError

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq")
EXACT_UP_TO = 50_000  # auto: exact search up to this many vectors
TARGET_RECALL = 0.99
SIMS_BUDGET = 1 << 25  # exact CPU search: at most this many similarities (128 MB) in memory at once
NUMPY_MAX_BATCH = 32  # exact CPU search: numpy up to this many queries at once, faiss above


def gpu_count() -> int:
    """GPUs usable by faiss: 0 with the CPU build (no StandardGpuResources) or with no GPU present."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a GPU build without a driver
        return 0


def use_gpu(device: str) -> bool:
    """Search on the GPU only if the encoder device is CUDA (or auto) and faiss can really use a GPU."""
    if gpu_count() == 0:
        return False
    return device == "auto" or device.startswith("cuda")


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
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def apply_params(inner: faiss.Index, plan: SearchPlan) -> None:
    """Set the run-time knobs (nprobe, efSearch, k_factor) that the plan chose."""
    p = plan.params
    if plan.type in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(inner).nprobe = int(p["nprobe"])
    if plan.type == "hnsw":
        faiss.downcast_index(inner).hnsw.efSearch = int(p["ef_search"])
    if plan.type == "ivfpq":
        faiss.downcast_index(inner).k_factor = float(p["k_factor"])


class VectorSearch:
    """Cosine search (vectors are L2-normalised, so inner product = cosine) with the kind a plan says."""

    def __init__(self, index: faiss.Index, plan: SearchPlan | None = None, gpu: bool = False) -> None:
        self.index = index  # the CPU IndexIDMap2 that is saved
        self.plan = plan or SearchPlan()
        inner = _inner(index)
        self.ids = (faiss.vector_to_array(index.id_map).astype(np.int64) if isinstance(index, faiss.IndexIDMap)
                    else np.arange(index.ntotal, dtype=np.int64))
        if self.plan.type != "flat":
            apply_params(inner, self.plan)
        self._flat: np.ndarray | None = None
        if isinstance(inner, faiss.IndexFlat) and inner.ntotal:
            # a view of faiss's own storage, not a copy
            self._flat = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)
        self.gpu = False
        self._search_index = inner
        if gpu and gpu_count() > 0 and self.plan.type != "hnsw":  # faiss has no GPU HNSW
            self._res = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(self._res, 0, inner)
            self.gpu = True

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, gpu: bool = False, index_type: str = "flat",
              seed: int = 0, progress: bool = False) -> VectorSearch:
        """Build the index; for approximate kinds, tune it to recall@10 >= 0.99 and record the measurement."""
        if index_type not in INDEX_TYPES:
            raise CbirError(f"unknown index type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n, d = vectors.shape
        kind = index_type
        if kind == "auto":
            kind = "flat" if n <= EXACT_UP_TO else "ivf"
        started = time.perf_counter()
        if kind != "flat" and n < 1000:
            return cls._flat_index(vectors, ids, gpu, index_type, f"{kind} needs at least 1000 vectors; exact")
        if kind == "flat":
            return cls._flat_index(vectors, ids, gpu, index_type)
        from cbir.tuning import build_approximate

        index, plan = build_approximate(kind, vectors, ids, seed=seed, progress=progress)
        if plan.type == "flat" and index_type == "auto":  # IVF could not reach the target: try a graph
            index, plan = build_approximate("hnsw", vectors, ids, seed=seed, progress=progress)
        if plan.type == "flat":  # nothing approximate reached the target: exact search
            return cls._flat_index(vectors, ids, gpu, index_type, plan.note)
        plan.build_s, plan.requested = round(time.perf_counter() - started, 2), index_type
        return cls(index, plan, gpu=gpu)

    @classmethod
    def _flat_index(cls, vectors: np.ndarray, ids: np.ndarray, gpu: bool, requested: str = "flat",
                    note: str = "") -> VectorSearch:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        if len(vectors):
            index.add_with_ids(vectors, ids)
        return cls(index, SearchPlan("flat", note=note, requested=requested), gpu=gpu)

    @classmethod
    def load(cls, path: Path, plan: SearchPlan | None = None, gpu: bool = False) -> VectorSearch:
        try:
            return cls(faiss.read_index(str(path)), plan, gpu=gpu)
        except RuntimeError as exc:
            raise CbirError(f"cannot read FAISS index {path}: {str(exc).splitlines()[0]}") from exc

    def save(self, path: Path) -> None:
        """Write beside the target, then rename: a reader never sees half a file."""
        tmp = Path(f"{path}.tmp-{os.getpid()}")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def exact(self) -> bool:
        return self.plan.type == "flat"

    def reconstruct(self, row: int) -> np.ndarray:
        """The stored vector at position `row` (for consistency checks; exact indexes only)."""
        if self._flat is None:
            raise CbirError("only an exact index can give back its vectors")
        return self._flat[row]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), each [B, k]; missing slots (k > N) have id -1 and score -inf."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise CbirError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        kk = min(k, self.ntotal)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        if kk == 0:
            return scores, ids
        if self._flat is not None and not self.gpu and len(q) <= NUMPY_MAX_BATCH:
            s, pos = exact_numpy(self._flat, q, kk)
        else:
            s, pos = self._search_index.search(q, kk)
        valid = pos >= 0
        scores[:, :kk] = np.where(valid, s, -np.inf)
        ids[:, :kk] = np.where(valid, self.ids[np.clip(pos, 0, None)], -1)
        return scores, ids


def exact_numpy(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of q [B, D] against x [N, D]: matrix products over query blocks, partial sorts."""
    block = max(1, SIMS_BUDGET // max(1, len(x)))
    if len(q) > block:
        parts = [exact_numpy(x, q[i:i + block], k) for i in range(0, len(q), block)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    sims = q @ x.T
    if k < sims.shape[1]:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(sims.shape[1]), (len(q), sims.shape[1]))
    top = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1).astype(np.int64)
