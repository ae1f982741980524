"""An index larger than memory: IVF-PQ trained on a sample, filled shard by shard, served from disk.

    train(sample)                    -> an empty, trained index (OPQ rotation, coarse centroids, PQ codebooks)
    fill(trained, vectors, ids, f)   -> one shard's codes, with the collection's global ids (any process, any order)
    merge(trained, shard files, out) -> one index whose inverted lists live in `faiss-<tag>.ivfdata` beside it
    load(out)                        -> that index, its lists memory-mapped (RAM holds only centroids and codebooks)

Shards are independent: `cbir index --engine ray` fills them in parallel tasks; merging streams them into
FAISS's OnDiskInvertedLists without holding them in memory. The PQ codes only find candidates: the exact
vectors (float16, memory-mapped from vectors.h5) re-rank them (see cbir.search.searcher.VectorSearch).

Parameters (a rule, not tuned on one set): about sqrt(N) lists, a power of two (FAISS's guidance is 4-16 sqrt(N);
fewer lists keep training and assignment affordable on a small machine, a larger nprobe makes up for it);
OPQ to at most 256 dimensions, PQ with 4 dimensions per 8-bit code (64 bytes a vector at 256-d).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from cbir.errors import CbirError
from cbir.search.plan import ONDISK as KIND
from cbir.search.plan import SearchPlan

log = logging.getLogger(__name__)

DATA_GLOB = "faiss-*.ivfdata"
TARGET_RECALL = 0.95
SHARD_ROWS = 500_000
MIN_VECTORS = 10_000  # the PQ codebooks need 256 x 39 training points


@dataclass(frozen=True)
class Layout:
    dim: int
    nlist: int
    d_out: int  # OPQ output dimension
    m: int  # PQ sub-quantizers (bytes per vector)

    @property
    def factory(self) -> str:
        return f"OPQ{self.m}_{self.d_out},IVF{self.nlist},PQ{self.m}"

    def to_dict(self) -> dict[str, int]:
        return {"nlist": self.nlist, "opq_dim": self.d_out, "pq_m": self.m, "pq_bits": 8}


def layout_for(n: int, dim: int) -> Layout:
    """The rule in the module docstring, bounded so every list gets >= 39 training points."""
    nlist = 2 ** round(math.log2(max(16.0, math.sqrt(n))))
    nlist = int(max(16, min(nlist, 65536, 2 ** int(math.log2(max(16, n // 39))))))
    d_out = min(256, dim - dim % 4)
    return Layout(dim, nlist, d_out, d_out // 4)


def sample_rows(n: int, layout: Layout, seed: int = 0) -> np.ndarray:
    """Training rows: 40 per list (at least 20,000 for the OPQ and PQ codebooks), sorted for sequential reads."""
    size = min(n, max(40 * layout.nlist, 20_000))
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def train(sample: np.ndarray, layout: Layout, seed: int = 0) -> faiss.Index:
    started = time.perf_counter()
    index = faiss.index_factory(layout.dim, layout.factory, faiss.METRIC_INNER_PRODUCT)
    cp = faiss.extract_index_ivf(index).cp
    cp.seed, cp.niter = seed, 10  # 10 k-means rounds: near-final centroids at 40% of the default cost
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    opq.niter = 10  # of 50 by default: the rotation settles early, each round trains a PQ again
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    log.info(f"on-disk index: trained {layout.factory} on {len(sample)} vectors in "
             f"{time.perf_counter() - started:.1f} s")
    return index


def fill(trained: bytes | faiss.Index, vectors: np.ndarray, ids: np.ndarray, out: str | Path) -> int:
    """Encode one shard with its global ids into its own index file; returns its row count."""
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8)) if isinstance(trained, bytes) \
        else faiss.clone_index(trained)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))
    faiss.write_index(index, str(out))
    return int(index.ntotal)


def serialize(index: faiss.Index) -> bytes:
    """The trained index as bytes, to send to shard tasks."""
    return faiss.serialize_index(index).tobytes()


def merge(trained: faiss.Index, shards: list[Path], out: Path, data_dir: Path) -> Path:
    """Merge shard files into `out` (written as given: the caller renames it into place); returns the data file."""
    from faiss.contrib.ondisk import merge_ondisk

    data = data_dir / f"faiss-{uuid.uuid4().hex[:12]}.ivfdata"  # a new name: servers of the old index keep theirs
    index = faiss.clone_index(trained)
    with _native_stdout_to_log():
        merge_ondisk(index, [str(s) for s in shards], str(data))
    faiss.write_index(index, str(out))
    return data


def load(path: Path) -> faiss.Index:
    """The index with its inverted lists memory-mapped from the data file beside it."""
    try:
        with _native_stdout_to_log():
            return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as exc:
        raise CbirError(f"cannot read the on-disk index {path} or its {DATA_GLOB} data file beside it "
                        f"({str(exc).strip().splitlines()[-1][:200]}); rebuild it with cbir index --rebuild") from None


@contextlib.contextmanager
def _native_stdout_to_log() -> Iterator[None]:
    """FAISS's C++ code prints progress on stdout (file descriptor 1), where it would break `--json` output:
    send it to stderr while the call runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def build(vectors: np.ndarray | Path, out: Path, data_dir: Path, *, seed: int = 0, shard_rows: int = SHARD_ROWS,
          mapper: Callable[..., Iterable[int]] = map) -> tuple[Layout, Path]:
    """Train, fill shard by shard (`mapper(fill_rows, ...)` runs them: map here, Ray tasks with --engine ray), merge.

    `vectors`: an array (ids = row numbers), or a vectors.h5 (its ids; opened memory-mapped, so it may be larger
    than RAM: only the sample and one shard at a time are read).
    """
    rows_of = _open(vectors)
    n, dim = rows_of.shape
    layout = layout_for(n, dim)
    trained = train(np.asarray(rows_of[sample_rows(n, layout, seed)], np.float32), layout, seed)
    blob = serialize(trained)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".shards-") as tmp:
        starts = list(range(0, n, shard_rows))
        files = [Path(tmp) / f"shard-{i:05d}.index" for i in range(len(starts))]
        started = time.perf_counter()
        total = sum(mapper(fill_rows, [blob] * len(starts), [vectors] * len(starts), starts,
                           [shard_rows] * len(starts), files))
        log.info(f"on-disk index: {len(files)} shards, {total} vectors encoded in "
                 f"{time.perf_counter() - started:.1f} s")
        data = merge(trained, files, out, data_dir)
    return layout, data


def build_index(vectors_file: Path, out: Path, *, seed: int = 0, shard_rows: int = SHARD_ROWS,
                mapper: Callable[..., Iterable[int]] = map) -> SearchPlan:
    """The on-disk index of a vectors file (written with known rows: contiguous), tuned; its data file beside `out`."""
    from cbir.search.searcher import VectorSearch
    from cbir.search.store import open_lazy

    started = time.perf_counter()
    layout, data = build(vectors_file, out, out.parent, seed=seed, shard_rows=shard_rows, mapper=mapper)
    seconds = time.perf_counter() - started
    store = open_lazy(vectors_file)
    assert store.vectors is not None
    if not isinstance(store.ids, range):
        raise ValueError("tuning needs ids equal to row numbers (a fresh build)")
    index, read_rows = load(out), rows_reader(store.vectors)
    plan = tune(lambda plan: VectorSearch(index, plan, exact_rows=read_rows), store.vectors, layout, seconds, seed)
    plan.params["data"] = data.name
    return plan


def rows_reader(vectors: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Rows by position as float32, from a memory map. The rows' pages are first requested all at once
    (posix_fadvise WILLNEED: the disk reads them in parallel), then copied: on a 25 GB file that the page cache
    cannot hold, 40 scattered rows took 20 ms read one fault after another (benchmarks/scale.py)."""
    fd = os.open(vectors.filename, os.O_RDONLY) if isinstance(vectors, np.memmap) and vectors.filename else None
    row_bytes = vectors.shape[1] * vectors.dtype.itemsize
    base = int(getattr(vectors, "offset", 0))

    def read(rows: np.ndarray) -> np.ndarray:
        if fd is not None and len(rows) > 1:
            for r in rows:
                os.posix_fadvise(fd, base + int(r) * row_bytes, row_bytes, os.POSIX_FADV_WILLNEED)
        return np.asarray(vectors[rows], np.float32)

    return read


def _open(vectors: np.ndarray | Path) -> np.ndarray:
    if isinstance(vectors, np.ndarray):
        return vectors
    from cbir.search.store import open_lazy

    store = open_lazy(Path(vectors))
    assert store.vectors is not None
    return store.vectors


def fill_rows(blob: bytes, vectors: np.ndarray | Path, start: int, rows: int, out: Path) -> int:
    """One shard: rows [start, start + rows) of `vectors` (see `build`) with their ids."""
    if isinstance(vectors, np.ndarray):
        part, ids = vectors[start:start + rows], np.arange(start, min(start + rows, len(vectors)))
    else:
        from cbir.search.store import open_lazy

        store = open_lazy(Path(vectors))
        assert store.vectors is not None
        part = store.vectors[start:start + rows]
        ids = np.arange(start, start + len(part)) if isinstance(store.ids, range) else store.ids[start:start + rows]
    return fill(blob, np.asarray(part, np.float32), np.asarray(ids, np.int64), out)


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


def settings(nlist: int) -> list[tuple[int, int]]:
    """(nprobe, k_factor) from cheapest to dearest."""
    return [(p, kf) for p in (8, 16, 32, 64, 128, 256) if p <= max(8, nlist // 4) for kf in (4, 8, 16)]


def tune(search_for: Callable[[SearchPlan], object], vectors: np.ndarray, layout: Layout, seconds: float,
         seed: int = 0, queries: int = 200) -> SearchPlan:
    """The cheapest (nprobe, k_factor) whose recall@10, measured against exact search on held-out rows of the
    collection (each row's own id left out), reaches TARGET_RECALL; the dearest measured if none does.

    `search_for(plan)` gives a VectorSearch configured by the plan (ids are row numbers here).
    """
    from cbir.metrics import drop_self, overlap

    n = len(vectors)
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(queries, n), replace=False))
    q = np.asarray(vectors[rows], np.float32)
    truth = drop_self(exact_top(vectors, q, 11), rows, 10)
    plan = SearchPlan(KIND)
    for nprobe, kf in settings(layout.nlist):
        plan = SearchPlan(KIND, {**layout.to_dict(), "nprobe": nprobe, "k_factor": kf}, requested="ivfpq",
                          queries=len(rows), build_s=round(seconds, 2))
        _, found = search_for(plan).search(q, 11)  # type: ignore[attr-defined]
        plan.recall_at_10 = round(overlap(truth, drop_self(found, rows, 10)), 4)
        log.info(f"on-disk index: nprobe {nprobe} k_factor {kf} recall@10 {plan.recall_at_10:.4f}")
        if plan.recall_at_10 >= TARGET_RECALL:
            break
    return plan


def remove_stale(data_dir: Path, keep: str | None) -> None:
    """Delete data files no index refers to any more (a server still mapping one keeps its pages)."""
    for f in data_dir.glob(DATA_GLOB):
        if f.name != keep:
            f.unlink(missing_ok=True)
