"""Vector search over an index's vectors: exact up to 50k vectors, approximate (tuned, measured) above.

On disk the FAISS index is an IndexIDMap2 over an inner index, so it answers with the stable ids of
`vectors.h5`. The inner index is searched directly (cloned to the GPU when a GPU build of faiss sees a GPU)
and positions are mapped to ids here. Exact search of a few queries on the CPU runs as one numpy matrix
product over faiss's own storage (no copy): on these CPUs it beat IndexFlatIP by 2x for one query and
by 1.1-8x up to 16 queries at 100k x 1280 and x 2048, while at 64 queries faiss won at 2048 dimensions
(benchmarks/search.py). So numpy answers batches up to 32 queries, faiss larger ones.

This module only loads, saves and searches. Which kind of index to build, and the recall@10 measured against
exact search on a held-out sample of the collection's own vectors, is decided in `cbir.search.tuning` and recorded
as a `SearchPlan` (cbir.search.plan), stored in the vectors file and shown by `cbir info`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np

from cbir.errors import CbirError
from cbir.files import atomic_path
from cbir.metrics import SIMS_BUDGET
from cbir.search.plan import ONDISK, SearchPlan, apply_params

NUMPY_MAX_BATCH = 32  # exact CPU search: numpy up to this many queries at once, faiss above
FEW_QUERIES = 4  # an on-disk index searches up to this many queries on one thread
DEFAULT_THREADS = faiss.omp_get_max_threads()


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


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


class VectorSearch:
    """Cosine search (vectors are L2-normalised, so inner product = cosine) with the kind a plan says."""

    def __init__(self, index: faiss.Index, plan: SearchPlan | None = None, gpu: bool = False,
                 exact_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """`exact_rows(ids)` gives stored vectors by id: with it, an on-disk index re-ranks its PQ candidates."""
        self.index = index  # the CPU IndexIDMap2 that is saved (an on-disk IVF holds the ids itself)
        self.plan = plan or SearchPlan()
        inner = _inner(index)
        self.ids: np.ndarray | None = None  # position -> id; None: the index answers with ids already
        if isinstance(index, faiss.IndexIDMap):
            self.ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        elif self.plan.type != ONDISK:
            self.ids = np.arange(index.ntotal, dtype=np.int64)
        self.exact_rows = exact_rows
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
    def load(cls, path: Path, plan: SearchPlan | None = None, gpu: bool = False) -> VectorSearch:
        try:
            return cls(faiss.read_index(str(path)), plan, gpu=gpu)
        except RuntimeError as exc:
            raise CbirError(f"cannot read FAISS index {path}: {str(exc).splitlines()[0]}") from exc

    def save(self, path: Path) -> None:
        """Write beside the target, then rename: a reader never sees half a file."""
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

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
        elif self.exact_rows is not None:
            candidates = min(self.ntotal, kk * int(self.plan.params.get("k_factor", 1)))
            with _threads(1 if len(q) <= FEW_QUERIES else 0):
                found = self._search_index.search(q, candidates)[1]
            s, pos = rerank(q, found, self.exact_rows, kk)
        else:
            s, pos = self._search_index.search(q, kk)
        valid = pos >= 0
        scores[:, :kk] = np.where(valid, s, -np.inf)
        found = pos if self.ids is None else self.ids[np.clip(pos, 0, None)]
        ids[:, :kk] = np.where(valid, found, -1)
        return scores, ids


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP threads for one call (0: unchanged). Waking a second thread for one query's few lists cost
    more than the lists: 3.8 ms against 0.8 ms on the 10M on-disk index (2 cores)."""
    if n <= 0:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:  # back to the process default, not to "what it was": two request threads cannot leave it at 1
        faiss.omp_set_num_threads(DEFAULT_THREADS)


def rerank(q: np.ndarray, candidates: np.ndarray, exact_rows: Callable[[np.ndarray], np.ndarray],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidate ids (read once for the batch), best k first."""
    unique = np.unique(candidates[candidates >= 0])
    rows = exact_rows(unique) if len(unique) else np.zeros((0, q.shape[1]), np.float32)
    scores = np.full((len(q), k), -np.inf, np.float32)
    ids = np.full((len(q), k), -1, np.int64)
    for i, cand in enumerate(candidates):
        cand = cand[cand >= 0]
        sims = rows[np.searchsorted(unique, cand)] @ q[i]
        top = np.argsort(-sims, kind="stable")[:k]
        scores[i, :len(top)], ids[i, :len(top)] = sims[top], cand[top]
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
