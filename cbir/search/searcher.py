"""Vector search over one segment's rows: exact up to 50k vectors, approximate (tuned, measured) above.

A segment's FAISS index answers row positions (an IndexIDMap2 on disk, searched through its inner index; an on-disk
IVF-PQ labelled with row numbers); the segment maps them to its ids. Exact search of a few queries on the CPU runs as
one numpy matrix product over faiss's own storage (no copy): on these CPUs it beat IndexFlatIP by 2x for one query
and by 1.1-8x up to 16 queries at 100k x 1280 and x 2048, while at 64 queries faiss won at 2048 dimensions
(benchmarks/search.py). So numpy answers batches up to 32 queries, faiss larger ones.

Rows can be left out of a search (deleted rows, rows a filter does not match): `Allowed` names the rows that may be
answered. FAISS leaves the others out inside the search (an id selector over row positions), or, when few rows are
allowed, those rows alone are scanned exactly; the GPU (no selectors) fetches more and drops them.

This module only loads, saves and searches. Which kind of index to build, and the recall@10 measured against
exact search on a held-out sample of the collection's own vectors, is decided in `cbir.search.tuning` and recorded
as a `SearchPlan` (cbir.search.plan), stored with the segment and shown by `cbir info`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from cbir.errors import CbirError
from cbir.files import atomic_path
from cbir.metrics import SIMS_BUDGET
from cbir.search.plan import ONDISK, SearchPlan, apply_params, search_params

NUMPY_MAX_BATCH = 32  # exact CPU search: numpy up to this many queries at once, faiss above
FEW_QUERIES = 4  # an on-disk index searches up to this many queries on one thread
SCAN_AT_MOST = 20_000  # at most this many allowed rows: scan them exactly instead of searching the index
KEEP_SCANNED = 16 << 20  # a filter's scanned rows are kept (with its latest mask) up to this many bytes
GPU_OVERFETCH = 1024  # the GPU leaves out at most this many rows by fetching more; beyond, the CPU index answers
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


@dataclass(eq=False)
class Allowed:
    """The rows of a segment that a search may answer (a bool per row), with what FAISS needs made once."""

    mask: np.ndarray
    count: int = -1
    _bits: np.ndarray | None = field(default=None, repr=False)
    _rows: np.ndarray | None = field(default=None, repr=False)
    _vectors: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, bool)
        if self.count < 0:
            self.count = int(np.count_nonzero(self.mask))

    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.flatnonzero(self.mask)
        return self._rows

    def vectors(self, read: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The allowed rows' vectors (`read(rows)`), kept when they take at most KEEP_SCANNED bytes: gathering
        10,000 scattered rows of 1M x 256 took 2.3 ms a query, the scan itself 0.2-0.4 ms."""
        if self._vectors is not None:
            return self._vectors
        x = np.asarray(read(self.rows()))
        if x.nbytes <= KEEP_SCANNED:
            self._vectors = x
        return x

    def selector(self) -> faiss.IDSelector:
        """A bitmap selector over row positions (the bitmap is kept alive with this record)."""
        if self._bits is None:
            self._bits = np.packbits(self.mask, bitorder="little")
        return faiss.IDSelectorBitmap(len(self.mask), faiss.swig_ptr(self._bits))

    def __and__(self, other: Allowed | None) -> Allowed:
        return self if other is None else Allowed(self.mask & other.mask)


class VectorSearch:
    """Cosine search (vectors are L2-normalised, so inner product = cosine) with the kind a plan says."""

    def __init__(self, index: faiss.Index, plan: SearchPlan | None = None, gpu: bool = False,
                 exact_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """`exact_rows(rows)` gives stored vectors by row: an on-disk index re-ranks its PQ candidates with them, and
        a search allowed few rows scans them."""
        self.index = index  # the CPU index that is saved
        self.plan = plan or SearchPlan()
        inner = _inner(index)
        # the ids the file was built with (an IndexIDMap2): checked against the segment's own column
        self.ids = (faiss.vector_to_array(index.id_map).astype(np.int64) if isinstance(index, faiss.IndexIDMap)
                    else None)
        self.exact_rows = exact_rows
        if not self.plan.exact:
            apply_params(inner, self.plan)
        self._flat: np.ndarray | None = None
        if isinstance(inner, faiss.IndexFlat) and inner.ntotal:
            # a view of faiss's own storage, not a copy
            self._flat = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)
        self.gpu = False
        self._inner = inner
        self._gpu_index: faiss.Index | None = None
        if gpu and gpu_count() > 0 and self.plan.type not in ("hnsw", ONDISK):  # faiss has no GPU HNSW
            self._res = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._res, 0, inner)
            self.gpu = True

    @classmethod
    def load(cls, path: Path, plan: SearchPlan | None = None, gpu: bool = False,
             exact_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> VectorSearch:
        try:
            return cls(faiss.read_index(str(path)), plan, gpu=gpu, exact_rows=exact_rows)
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
    def faiss_index(self) -> faiss.Index:
        """The CPU index searched (an IndexIDMap's inner index)."""
        return self._inner

    @property
    def exact(self) -> bool:
        return self.plan.exact

    def reconstruct(self, row: int) -> np.ndarray:
        """The stored vector at position `row` (for consistency checks; exact indexes only)."""
        if self._flat is None:
            raise CbirError("only an exact index can give back its vectors")
        return self._flat[row]

    def search(self, queries: np.ndarray, k: int, allowed: Allowed | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, rows), each [B, k]; missing slots (k > rows allowed) have row -1 and score -inf."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise CbirError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        if allowed is not None and allowed.count >= self.ntotal:
            allowed = None
        kk = min(k, self.ntotal if allowed is None else allowed.count)
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        if kk == 0:
            return scores, rows
        s, pos = self._search(q, kk, allowed)
        valid = pos >= 0
        scores[:, :kk], rows[:, :kk] = np.where(valid, s, -np.inf), np.where(valid, pos, -1)
        return scores, rows

    def _search(self, q: np.ndarray, k: int, allowed: Allowed | None) -> tuple[np.ndarray, np.ndarray]:
        if allowed is not None and allowed.count <= SCAN_AT_MOST and (self._flat is not None or self.exact_rows):
            x = allowed.vectors(self._flat.__getitem__ if self._flat is not None else self.exact_rows)  # type: ignore
            s, pos = scan(x, q, k)
            return s, allowed.rows()[pos]
        if self._flat is not None and not self.gpu and len(q) <= NUMPY_MAX_BATCH:
            return exact_numpy(self._flat, q, k, None if allowed is None else allowed.mask)
        if self.plan.type == ONDISK:
            assert self.exact_rows is not None
            candidates = min(self.ntotal, k * int(self.plan.params.get("k_factor", 1)))
            params = search_params(self.plan, *_selection(allowed, self.ntotal))
            with threads(1 if len(q) <= FEW_QUERIES else 0):
                found = self._inner.search(q, candidates, params=params)[1]
            return rerank(q, found, self.exact_rows, k)
        if self._gpu_index is not None and (allowed is None or self.ntotal - allowed.count <= GPU_OVERFETCH):
            extra = 0 if allowed is None else self.ntotal - allowed.count
            s, pos = self._gpu_index.search(q, min(self.ntotal, k + extra))
            return _drop_disallowed(s, pos, allowed, k)
        params = search_params(self.plan, *_selection(allowed, self.ntotal))
        return self._inner.search(q, k, params=params)


def _selection(allowed: Allowed | None, ntotal: int) -> tuple[faiss.IDSelector | None, float]:
    """The selector of the allowed rows and the share of the rows it allows (search_params widens the search)."""
    if allowed is None:
        return None, 1.0
    return allowed.selector(), allowed.count / max(1, ntotal)


def _drop_disallowed(scores: np.ndarray, rows: np.ndarray, allowed: Allowed | None,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's first k answers that are allowed (the GPU fetched more than k)."""
    if allowed is None:
        return scores[:, :k], rows[:, :k]
    out_s, out_r = np.full((len(rows), k), -np.inf, np.float32), np.full((len(rows), k), -1, np.int64)
    for i, (s, r) in enumerate(zip(scores, rows, strict=True)):
        keep = (r >= 0) & allowed.mask[np.clip(r, 0, None)]
        out_s[i, :keep.sum()], out_r[i, :keep.sum()] = s[keep][:k], r[keep][:k]
    return out_s, out_r


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
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
    """Exact scores of each query's candidate rows (read once for the batch), best k first."""
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


def scan(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a few queries over a few rows (a filter's matching rows) on this thread: BLAS's two threads cost 12 ms
    for one query against 10,000 x 256 rows while other processes held the cores, one thread 0.2-0.4 ms (numpy's own
    einsum loop; measured in benchmarks/filtered_search.py's runs)."""
    if len(q) > FEW_QUERIES:
        return exact_numpy(x, q, k)
    return _top_k(np.einsum("nd,qd->qn", x, q), k)


def exact_numpy(x: np.ndarray, q: np.ndarray, k: int,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of q [B, D] against x [N, D] (rows where `mask` is False left out): matrix products over
    query blocks, partial sorts."""
    block = max(1, SIMS_BUDGET // max(1, len(x)))
    if len(q) > block:
        parts = [exact_numpy(x, q[i:i + block], k, mask) for i in range(0, len(q), block)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    sims = q @ x.T
    if mask is not None:
        sims[:, ~mask] = -np.inf
    top, part = _top_k(sims, k)
    return top, np.where(np.isneginf(top), -1, part)


def _top_k(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of `sims` [B, N] and their positions, best first (partial sort, then a sort of k)."""
    if k < sims.shape[1]:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
    top = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1).astype(np.int64)
