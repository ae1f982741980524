"""An index larger than memory: IVF-PQ trained on a sample, filled shard by shard, served from disk.

    train(sample)                    -> an empty, trained index (OPQ rotation, coarse centroids, PQ codebooks)
    fill(trained, vectors, rows, f)  -> one shard's codes, labelled with their row numbers (any process, any order)
    merge(trained, shard files, out) -> one index whose inverted lists live in `faiss-<tag>.ivfdata` beside it
    load(out)                        -> that index, its lists memory-mapped (RAM holds only centroids and codebooks)

Shards are independent: `cbir index --engine ray` fills them in parallel tasks; merging streams them into
FAISS's OnDiskInvertedLists without holding them in memory. The PQ codes only find candidates: the exact
vectors (float16, memory-mapped from the segment's HDF5 file) re-rank them (see cbir.search.searcher.VectorSearch).
The lists hold row numbers of their segment (ids are the segment's column), like every other segment's index.

A segment added to an on-disk index later (an update, an upload) is encoded with the first segment's trained index,
saved beside it (`trained-<tag>.faiss`): no training, the same codes, and the recall the first one measured.

Parameters (a rule, not tuned on one set): about sqrt(N) lists, a power of two (`plan.nlist_for`); OPQ to at most
256 dimensions, PQ with 4 dimensions per 8-bit code (64 bytes a vector at 256-d).
"""

from __future__ import annotations

import contextlib
import logging
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
from cbir.search.plan import ON_DISK_RECALL, ONDISK, HeldOut, SearchPlan, cheapest_reaching, nlist_for

log = logging.getLogger(__name__)

DATA_GLOB = "faiss-*.ivfdata"
TRAINED_GLOB = "trained-*.faiss"
SHARD_ROWS = 500_000
MIN_VECTORS = 10_000  # the PQ codebooks need 256 x 39 training points
TUNING_QUERIES = 200


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
    """The rule in the module docstring: sqrt(N) lists, OPQ to <= 256 dimensions, 4 dimensions per code byte."""
    d_out = min(256, dim - dim % 4)
    return Layout(dim, nlist_for(n, 1), d_out, d_out // 4)


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


def fill(trained: bytes | faiss.Index, vectors: np.ndarray, rows: np.ndarray, out: str | Path) -> int:
    """Encode one shard, labelled with its row numbers, into its own index file; returns its row count."""
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8)) if isinstance(trained, bytes) \
        else faiss.clone_index(trained)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(rows, np.int64))
    faiss.write_index(index, str(out))
    return int(index.ntotal)


def serialize(index: faiss.Index) -> bytes:
    """The trained index as bytes, to send to shard tasks."""
    return faiss.serialize_index(index).tobytes()


def merge(trained: bytes, shards: list[Path], out: Path, data_dir: Path) -> Path:
    """Merge shard files into `out` (written as given: the caller renames it into place); returns the data file."""
    from faiss.contrib.ondisk import merge_ondisk

    data = data_dir / f"faiss-{uuid.uuid4().hex[:12]}.ivfdata"  # a new name: servers of the old index keep theirs
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
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


def trained_of(path: Path) -> bytes:
    """The trained, empty index of an on-disk index file (an index built before trained files were kept)."""
    index = load(path)
    ivf = faiss.extract_index_ivf(index)
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    empty.this.disown()  # owned by the index from here on
    ivf.replace_invlists(empty, True)
    ivf.ntotal = index.ntotal = 0
    return serialize(index)


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
          mapper: Callable[..., Iterable[int]] = map, trained: bytes | None = None) -> tuple[bytes, Path]:
    """Train (unless `trained` is given), fill shard by shard (`mapper(fill_rows, ...)` runs them: map here, Ray tasks
    with --engine ray), merge. Returns the trained index (bytes) and the data file.

    `vectors`: an array, or a segment's HDF5 file (opened memory-mapped, so it may be larger than RAM: only the
    sample and one shard at a time are read).
    """
    rows_of = _open(vectors)
    n, dim = rows_of.shape
    if trained is None:
        layout = layout_for(n, dim)
        trained = serialize(train(np.asarray(rows_of[sample_rows(n, layout, seed)], np.float32), layout, seed))
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".shards-") as tmp:
        starts = list(range(0, n, shard_rows))
        files = [Path(tmp) / f"shard-{i:05d}.index" for i in range(len(starts))]
        started = time.perf_counter()
        total = sum(mapper(fill_rows, [trained] * len(starts), [vectors] * len(starts), starts,
                           [shard_rows] * len(starts), files))
        log.info(f"on-disk index: {len(files)} shards, {total} vectors encoded in "
                 f"{time.perf_counter() - started:.1f} s")
        data = merge(trained, files, out, data_dir)
    return trained, data


def build_index(vectors_file: Path, out: Path, *, seed: int = 0, shard_rows: int = SHARD_ROWS,
                mapper: Callable[..., Iterable[int]] = map, base: SearchPlan | None = None) -> SearchPlan:
    """The on-disk index of a segment's file (written with known rows: contiguous), its data file beside `out`.

    The first segment is trained and tuned (its trained index saved as `trained-<tag>.faiss`); a later one (`base`:
    the first one's plan) is encoded with that trained index and searched with the same settings."""
    from cbir.search import store
    from cbir.search.searcher import VectorSearch

    started = time.perf_counter()
    if base is None:
        rows = store.read_attrs(vectors_file).get("count", 0)
        if rows < MIN_VECTORS:
            raise CbirError(f"an on-disk index needs at least {MIN_VECTORS:,} images to train on; this collection "
                            f"has {rows:,}: leave out --on-disk (it fits in memory)")
    given = (out.parent / base.params["trained"]).read_bytes() if base is not None else None
    trained, data = build(vectors_file, out, out.parent, seed=seed, shard_rows=shard_rows, mapper=mapper,
                          trained=given)
    if base is not None:
        return SearchPlan(ONDISK, {**base.params, "data": data.name}, recall_at_10=base.recall_at_10,
                          queries=base.queries, build_s=round(time.perf_counter() - started, 2), requested="ivfpq",
                          note="encoded with the first segment's trained index; recall as measured on it")
    name = save_trained(trained, out.parent)
    rows_file = store.open_lazy(vectors_file)
    try:
        index, read_rows = load(out), rows_reader(rows_file.vectors)
        plan = tune(lambda plan: VectorSearch(index, plan, exact_rows=read_rows), rows_file.vectors,
                    layout_for(len(rows_file), rows_file.dim), time.perf_counter() - started, seed)
    finally:
        rows_file.close()
    plan.params.update(data=data.name, trained=name)
    return plan


def save_trained(trained: bytes, folder: Path) -> str:
    from cbir.files import atomic_path

    name = f"trained-{uuid.uuid4().hex[:12]}.faiss"
    with atomic_path(folder / name) as tmp:
        tmp.write_bytes(trained)
    return name


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
    """One shard: rows [start, start + rows) of `vectors` (see `build`), labelled with their row numbers."""
    part = _open(vectors)[start:start + rows]
    return fill(blob, np.asarray(part, np.float32), np.arange(start, start + len(part)), out)


def settings(nlist: int) -> list[tuple[int, int]]:
    """(nprobe, k_factor) from cheapest to dearest."""
    return [(p, kf) for p in (8, 16, 32, 64, 128, 256) if p <= max(8, nlist // 4) for kf in (4, 8, 16)]


def tune(search_for: Callable[[SearchPlan], object], vectors: np.ndarray, layout: Layout, seconds: float,
         seed: int = 0) -> SearchPlan:
    """The cheapest (nprobe, k_factor) whose recall@10, measured against exact search on held-out rows of the
    collection (each row's own left out), reaches ON_DISK_RECALL; the dearest measured if none does.

    `search_for(plan)` gives a VectorSearch configured by the plan (answering row positions).
    """
    held = HeldOut.sample(vectors, seed + 1, TUNING_QUERIES)
    plans = (SearchPlan(ONDISK, {**layout.to_dict(), "nprobe": nprobe, "k_factor": kf}, requested="ivfpq",
                        queries=len(held.rows), build_s=round(seconds, 2)) for nprobe, kf in settings(layout.nlist))
    plan, _ = cheapest_reaching(plans, lambda plan: held.recall(search_for(plan).search(held.queries, 11)[1]),
                                ON_DISK_RECALL, lambda text: log.info(f"on-disk index: {text}"))
    return plan


def remove_stale(data_dir: Path, keep: set[str]) -> None:
    """Delete data and trained files no segment refers to any more (a server still mapping one keeps its pages)."""
    for f in [*data_dir.glob(DATA_GLOB), *data_dir.glob(TRAINED_GLOB)]:
        if f.name not in keep:
            f.unlink(missing_ok=True)
