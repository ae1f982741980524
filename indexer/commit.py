"""Commit stage: kept rows and new chunks -> a new vectors.h5 and faiss.index, renamed into place.

Both files are written beside the old ones and renamed at the very end, vectors.h5 last (the commit point):
a reader sees the old index or the new one, never a mix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbir.encoders import Encoder
from cbir.errors import CbirError
from cbir.files import atomic_path
from cbir.images import Skipped
from cbir.layout import FAISS, VECTORS
from cbir.search import ondisk, tuning
from cbir.search import store as store_mod
from cbir.search.expansion import Expansion, augment_database, combine
from cbir.search.plan import SearchPlan
from cbir.search.searcher import VectorSearch
from cbir.search.store import Store
from cbir.version import __version__
from cbir.words import Words
from cbir.words import measure as measure_words
from indexer.source import Source
from indexer.work import Chunk, WorkDir

BLOCK = 1024  # rows written at a time: memory stays flat however large the collection


@dataclass(kw_only=True)
class CommitJob:
    source: Source
    out: Path
    encoder: Encoder
    old: Store | None  # the index being updated, if any
    keep: dict[str, int]  # path -> row of `old` to keep
    work: WorkDir
    discovery_skips: list[Skipped] = field(default_factory=list)
    index_type: str = "auto"
    float16: bool = False
    started: float = 0.0
    expansion: Expansion = field(default_factory=Expansion)
    preset: str | None = None
    on_disk: bool = False  # IVF-PQ on disk, built shard by shard (cbir/search/ondisk.py)
    mapper: Callable[..., Iterable[int]] | None = None  # runs the on-disk shards (map, or Ray tasks)


@dataclass(kw_only=True)
class Committed:
    indexed: int
    added: int
    skipped: list[Skipped]


@dataclass
class _Rows:
    """Where each row of the new index comes from."""

    order: list[str]  # paths, sorted: the row order of the new file
    ids: dict[str, int]
    new: dict[str, tuple[int, int]]  # path -> (chunk number, row in chunk)
    chunks: list[Chunk]
    skipped: dict[str, str]


def commit(job: CommitJob) -> Committed:
    rows = _gather(job)
    attrs = {"encoder": job.encoder.name, "encoder_config": json.dumps(job.encoder.config, sort_keys=True),
             "root": job.source.resolved(), "cbir_version": __version__, "created": store_mod.now_iso(),
             "vector_dtype": "float16" if job.float16 else "float32", "preset": job.preset or ""}
    with atomic_path(job.out / VECTORS) as tmp_vec, atomic_path(job.out / FAISS) as tmp_faiss:
        writer = store_mod.VectorWriter(tmp_vec, job.encoder.dim, attrs, dtype=attrs["vector_dtype"],
                                        rows=len(rows.order))
        try:
            for p in sorted(rows.skipped):
                writer.add_skipped(p, rows.skipped[p])
            _write_rows(writer, rows, job)
            writer.close({"seconds": time.perf_counter() - job.started, "skipped_count": len(rows.skipped),
                          "ids_are_rows": all(rows.ids[p] == n for n, p in enumerate(rows.order))})
        finally:
            writer.abort()
        if job.on_disk:
            plan, words = _on_disk(job, tmp_vec, tmp_faiss)
        else:
            plan, words = _in_memory(job, tmp_vec, tmp_faiss)
        store_mod.set_attrs(tmp_vec, {"search": json.dumps(plan.to_dict(), sort_keys=True),
                                      "expansion": json.dumps(job.expansion.to_dict(), sort_keys=True),
                                      "words": json.dumps(words.to_dict(), sort_keys=True)})
    ondisk.remove_stale(job.out, keep=plan.params.get("data"))
    old_paths = set(job.old.paths) if job.old is not None else set()
    return Committed(indexed=len(rows.order), added=sum(p not in old_paths for p in rows.order),
                     skipped=[Skipped(path=p, reason=r) for p, r in sorted(rows.skipped.items())])


def _in_memory(job: CommitJob, tmp_vec: Path, tmp_faiss: Path) -> tuple[SearchPlan, Words]:
    final = store_mod.read(tmp_vec)
    assert final.vectors is not None
    index, plan = tuning.build(final.vectors, final.ids, index_type=job.index_type)
    rows = final.vectors
    if job.expansion.dba_k and len(final.ids) > 1:
        rows = _augment(final.vectors, final.ids, VectorSearch(index, plan), job.expansion)
        store_mod.replace_vectors(tmp_vec, rows)
        index, plan = tuning.build(rows, final.ids, index_type=job.index_type)
    search = VectorSearch(index, plan)
    words = _words(job, final, rows, _expanded_query(search, final.ids, rows, job.expansion))
    search.save(tmp_faiss)
    return plan, words


def _on_disk(job: CommitJob, tmp_vec: Path, tmp_faiss: Path) -> tuple[SearchPlan, Words]:
    """IVF-PQ built shard by shard from the memory-mapped file; nothing holds all vectors (cbir/search/ondisk.py)."""
    if job.expansion.dba_k:
        raise CbirError("database-side augmentation (--dba) is not available with an on-disk index")
    final = store_mod.open_lazy(tmp_vec)
    try:
        if len(final) < ondisk.MIN_VECTORS:
            raise CbirError(f"an on-disk index needs at least {ondisk.MIN_VECTORS:,} images to train on; this "
                            f"collection has {len(final):,}: leave out --on-disk (it fits in memory)")
        if not isinstance(final.ids, range):  # an update renumbered nothing: ids stay, rows moved
            raise CbirError("an on-disk index is built fresh: use --rebuild (an update keeps ids that are no longer "
                            "row numbers)")
        plan = ondisk.build_index(tmp_vec, tmp_faiss, mapper=job.mapper or map)
        return plan, _words(job, final)
    finally:
        assert final.handle is not None
        final.handle.close()


def _words(job: CommitJob, final: Store, rows: np.ndarray | None = None,
           query: Callable[[np.ndarray], np.ndarray] | None = None) -> Words:
    """The confidence words, fitted on what search compares (`rows` as stored, queries as expanded): measured for a
    new index, kept by an update (same encoder, much the same collection: an update of one file should not pay for
    embedding a sample again)."""
    if job.old is not None and "words" in job.old.attrs:
        return Words.from_dict(json.loads(job.old.attrs["words"]))
    rows = final.vectors if rows is None else rows
    assert rows is not None
    return measure_words(job.encoder, lambda rel: job.source.read(rel)[0], final.paths, rows, query=query)


def _by_position(search: VectorSearch, ids: np.ndarray) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """Search answering in row positions rather than ids."""
    order = np.argsort(ids)
    sorted_ids = ids[order]

    def by_position(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, found = search.search(queries, k)
        at = np.clip(np.searchsorted(sorted_ids, found), 0, len(ids) - 1)
        return scores, np.where(found >= 0, order[at], -1)

    return by_position


def _augment(vectors: np.ndarray, ids: np.ndarray, search: VectorSearch, expansion: Expansion) -> np.ndarray:
    """alpha-DBA of every row, neighbours found with the index just built."""
    return augment_database(vectors, _by_position(search, ids), expansion.dba_k, expansion.dba_alpha)


def _expanded_query(search: VectorSearch, ids: np.ndarray, rows: np.ndarray,
                    expansion: Expansion) -> Callable[[np.ndarray], np.ndarray] | None:
    """Queries as the finished index will search with them (alpha-QE over its stored rows), or None without QE."""
    if not expansion.qe_k or len(ids) < 2:
        return None
    by_position = _by_position(search, ids)

    def expand(queries: np.ndarray) -> np.ndarray:
        scores, pos = by_position(np.ascontiguousarray(queries, dtype=np.float32), expansion.qe_k)
        scores = np.where(pos >= 0, scores, 0.0)
        return combine(queries, rows[np.clip(pos, 0, None)].astype(np.float32), scores, expansion.qe_alpha)

    return expand


def _gather(job: CommitJob) -> _Rows:
    chunks = list(job.work.chunks())
    new: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {s.path: s.reason for s in job.discovery_skips}
    for ci, c in enumerate(chunks):
        for r, p in enumerate(c.paths):
            new[p] = (ci, r)
            skipped.pop(p, None)
        for p, reason in c.skipped:
            if p not in new:
                skipped[p] = reason
    order = sorted(set(job.keep) | set(new))
    return _Rows(order, _assign_ids(order, job.old), new, chunks, skipped)


def _assign_ids(order: list[str], old: Store | None) -> dict[str, int]:
    """A fresh index numbers its rows 0..N-1 in path order; an update keeps old ids and numbers new files after."""
    if old is None:
        return {p: n for n, p in enumerate(order)}
    old_ids = {p: int(old.ids[i]) for i, p in enumerate(old.paths)}
    next_id = int(old.ids.max()) + 1 if len(old.ids) else 0
    ids: dict[str, int] = {}
    for p in order:
        if p in old_ids:
            ids[p] = old_ids[p]
        else:
            ids[p] = next_id
            next_id += 1
    return ids


def _write_rows(writer: store_mod.VectorWriter, rows: _Rows, job: CommitJob) -> None:
    dim = job.encoder.dim
    for start in range(0, len(rows.order), BLOCK):
        part = rows.order[start:start + BLOCK]
        vecs = np.empty((len(part), dim), np.float32)
        mt = np.empty(len(part), np.int64)
        sz = np.empty(len(part), np.int64)
        hs: list[str] = []
        for j, p in enumerate(part):
            if p in rows.new:
                ci, r = rows.new[p]
                c = rows.chunks[ci]
                vecs[j], mt[j], sz[j] = c.vectors[r], c.mtime_ns[r], c.size[r]
                hs.append(c.sha256[r])
            else:
                old, i = job.old, job.keep[p]
                assert old is not None and old.raw_vectors is not None
                vecs[j], mt[j], sz[j] = old.raw_vectors[i], old.mtime_ns[i], old.size[i]
                hs.append(old.sha256[i] if old.sha256 is not None else "")
        writer.append(vecs, part, mt, sz, ids=[rows.ids[p] for p in part], sha256=hs)
