"""Commit stage: the run's new rows -> one new segment, plus deletion markers for the rows that went, committed as
the index's next generation (cbir/search/writer.py writes every segment the same way).

A new index, or a rebuild, is one segment of every row (ids continue where the index's left off: never reused). An
update writes only what changed: a segment of the new, changed and renamed files, and deletions; no existing segment
file is rewritten. Then the merge policy may merge small segments (bounded in time; `cbir compact` merges all).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cbir import metadata
from cbir.encoders import Encoder
from cbir.errors import CbirError
from cbir.images import Skipped
from cbir.local_features import Features, pack
from cbir.metadata import GivenTags
from cbir.search import policy
from cbir.search.expansion import expand_queries
from cbir.search.manifest import Manifest, SegmentEntry, Settings
from cbir.search.segments import Generation, Segment
from cbir.search.store import now_iso
from cbir.search.writer import IndexWriter, RowBlock, raw_vectors_of
from cbir.words import Words
from cbir.words import measure as measure_words
from indexer.engine import Engine
from indexer.plan import Plan
from indexer.source import Source
from indexer.work import Chunk, WorkDir

BLOCK = 1024  # rows written at a time: memory stays flat however large the collection


@dataclass(kw_only=True)
class CommitJob:
    source: Source
    out: Path
    encoder: Encoder
    base: Manifest  # the generation being changed (a new index: an empty one)
    fresh: bool  # every row is written again (a new index, a rebuild)
    plan: Plan
    work: WorkDir
    settings: Settings
    engine: Engine  # runs an on-disk index's shards (this machine, or Ray tasks)
    discovery_skips: list[Skipped] = field(default_factory=list)
    left_out: dict[tuple[str, str], int] = field(default_factory=dict)  # files that are not pictures, counted
    tags: GivenTags | None = None  # --tags FILE.csv
    started: float = 0.0


@dataclass(kw_only=True)
class Committed:
    indexed: int
    added: int
    skipped: list[Skipped]
    manifest: Manifest


@dataclass
class _NewRows:
    """Where each row of the new segment comes from: a saved chunk, or an indexed row (a renamed file)."""

    order: list[str]  # paths, sorted: the row order of the new segment
    from_chunk: dict[str, tuple[int, int]]  # path -> (chunk number, row in chunk)
    reused: dict[str, int]  # path -> id of the indexed row whose vector it takes
    chunks: list[Chunk]
    skipped: dict[str, str]


def commit(job: CommitJob) -> Committed:
    rows = _gather(job)
    if not rows.order and (job.fresh or not job.base.segments):  # an index of nothing would replace one, or mislead
        raise CbirError(_nothing_readable(job.source, rows.skipped))
    writer = IndexWriter(job.out, job.base, mapper=job.engine.map, fresh=job.fresh)
    writer.manifest = replace(writer.manifest, settings=job.settings)
    _retag(job, writer, rows)
    writer.delete(job.plan.delete)
    ids = _ids(writer, rows.order, job.plan.same_id)
    updating = bool(job.base.segments) and not job.fresh
    blocks = _blocks(rows, ids, job, writer.generation() if updating else None)
    entry = writer.add_segment(len(rows.order), blocks)
    words = job.settings.words if job.base.segments and not job.fresh else _words(job, writer, entry)
    skipped = tuple(sorted(rows.skipped.items()))
    left_out = tuple(sorted((reason, ext, n) for (reason, ext), n in job.left_out.items()))
    manifest = writer.commit(settings=replace(job.settings, words=words), skipped=skipped, left_out=left_out,
                             removed=job.plan.kept_out, seconds=round(time.perf_counter() - job.started, 2),
                             created=job.base.created if updating else now_iso())
    manifest = policy.merge_small(job.out, manifest, mapper=job.engine.map)
    added = len(rows.order) - job.plan.changed - len(rows.reused)
    return Committed(indexed=manifest.live, added=added, skipped=[Skipped(path=p, reason=r) for p, r in skipped],
                     manifest=manifest)


def _nothing_readable(source: Source, skipped: dict[str, str]) -> str:
    """No file could be read as a picture: say which and why, and write no (empty) index."""
    named = "; ".join(f"{p} ({r})" for p, r in sorted(skipped.items())[:3])
    more = f"; {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"none of the {len(skipped)} image files in {source.location} could be read: {named}{more}. No index " \
        "was written."


def _ids(writer: IndexWriter, order: list[str], same_id: dict[str, int]) -> np.ndarray:
    """A changed file keeps its id (its old row is deleted, its new one carries the id on); the rest get new ones."""
    fresh = iter(writer.new_ids(sum(p not in same_id for p in order)))
    return np.array([same_id[p] if p in same_id else next(fresh) for p in order], np.int64)


def _words(job: CommitJob, writer: IndexWriter, entry: SegmentEntry | None) -> Words:
    """The confidence words of a new index, fitted on what its search compares (rows as stored, queries as
    expanded): measured once; an update keeps them (same encoder, much the same collection: an update of one file
    should not pay for embedding a sample again)."""
    if entry is None:
        return Words()
    folder = job.out
    segment = Segment.open(folder, entry)
    gen = Generation(folder, replace(writer.manifest, segments=(entry,)), [segment])
    qe = job.settings.expansion
    query = None
    if qe.qe_k and len(segment) > 1:
        def query(q: np.ndarray) -> np.ndarray:
            return expand_queries(q, gen.search, gen.vectors_of, qe.qe_k, qe.qe_alpha)
    try:
        return measure_words(job.encoder, lambda rel: job.source.read(rel)[0], segment.store.paths,
                             segment.store.vectors, query=query)
    finally:
        segment.store.close()


def _gather(job: CommitJob) -> _NewRows:
    """The plan's files from the saved chunks (a chunk of a killed run whose rows were committed after all is not
    taken again: only what this run planned to embed counts)."""
    chunks = list(job.work.chunks())
    planned = set(job.plan.todo)
    new: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {s.path: s.reason for s in job.discovery_skips}
    for ci, c in enumerate(chunks):
        for r, p in enumerate(c.paths):
            if p in planned:
                new[p] = (ci, r)
                skipped.pop(p, None)
        for p, reason in c.skipped:
            if p in planned and p not in new:
                skipped[p] = reason
    order = sorted(set(new) | set(job.plan.reuse))
    return _NewRows(order, new, dict(job.plan.reuse), chunks, skipped)


def _blocks(rows: _NewRows, ids: np.ndarray, job: CommitJob, old: Generation | None) -> Iterator[RowBlock]:
    """The new segment's rows, BLOCK at a time, from the chunks (or the renamed file's indexed row), with their local
    features when the chunks (or the indexed row) have them."""
    dim = job.encoder.dim
    for start in range(0, len(rows.order), BLOCK):
        part = rows.order[start:start + BLOCK]
        vectors = np.empty((len(part), dim), np.float32)
        mtimes, sizes = np.empty(len(part), np.int64), np.empty(len(part), np.int64)
        hashes: list[str] = []
        kept: list[Features | None] = []
        for j, path in enumerate(part):
            if path in rows.from_chunk:
                chunk_no, r = rows.from_chunk[path]
                chunk = rows.chunks[chunk_no]
                vectors[j], mtimes[j], sizes[j] = chunk.vectors[r], chunk.mtime_ns[r], chunk.size[r]
                hashes.append(chunk.sha256[r])
                kept.append(chunk.features.get(r) if chunk.features is not None else None)
            else:
                assert old is not None
                source_id = rows.reused[path]
                vectors[j] = raw_vectors_of(old, np.array([source_id]))[0]
                sizes[j], mtimes[j] = job.source.stat(path) or (0, 0)
                hashes.append(old.column("sha256", [source_id])[0])
                kept.append(old.features_of([source_id])[0])
        yield RowBlock(ids=ids[start:start + len(part)], paths=part, vectors=vectors, mtime_ns=mtimes, size=sizes,
                       sha256=hashes, meta=_meta(part, mtimes, rows, job, old),
                       features=pack(kept) if any(f is not None for f in kept) else None)


def _meta(part: list[str], mtimes: np.ndarray, rows: _NewRows, job: CommitJob,
          old: Generation | None) -> dict[str, np.ndarray]:
    """The rows' metadata: read by the decode workers (a renamed file: its indexed row's), their tags the file's own
    and those given with --tags (without it, those given before: metadata.with_tags)."""
    before = {p: rows.reused.get(p, job.plan.same_id.get(p)) for p in part}
    before = {p: i for p, i in before.items() if i is not None}
    old_meta = old.meta_of(list(before.values())) if old is not None and before else {}
    old_at = {p: n for n, p in enumerate(before)}
    metas = []
    for j, path in enumerate(part):
        previous = metadata.from_columns(old_meta, old_at[path]) if path in old_at else None
        chunk = rows.chunks[rows.from_chunk[path][0]] if path in rows.from_chunk else None
        if chunk is not None and chunk.meta:
            meta = metadata.from_columns(chunk.meta, rows.from_chunk[path][1])
        elif chunk is None and previous is not None:
            meta = metadata.from_columns(old_meta, old_at[path])
        else:
            meta = metadata.Meta(taken_ns=metadata.file_time_ns(int(mtimes[j])))
        given = job.tags.by_path.get(path, []) if job.tags is not None else None
        metas.append(metadata.with_tags(meta, given, previous))
    return metadata.to_columns(metas)


def _retag(job: CommitJob, writer: IndexWriter, rows: _NewRows) -> None:
    """An update with --tags: unchanged pictures whose tags change get a new row (their vector and metadata kept,
    their id too): a segment's rows are never rewritten in place."""
    if job.tags is None or job.fresh or not job.base.segments:
        return
    going = set(job.plan.delete)
    for seg in writer.generation().segments:
        live = seg.live_rows()
        meta = seg.meta(live)
        paths = seg.store.paths
        for n, row in enumerate(live):
            id_ = int(seg.store.ids_at(np.array([row]))[0])
            path = paths[int(row)]
            if id_ in going or path in rows.from_chunk:
                continue
            tags = job.tags.merged(path, metadata.split_tags(str(meta["own_tags"][n])))
            if metadata.TAG_SEPARATOR.join(tags) != str(meta["tags"][n]):
                rows.reused[path], job.plan.same_id[path] = id_, id_
                job.plan.delete.append(id_)
                job.plan.retagged += 1
    rows.order = sorted(set(rows.order) | set(rows.reused))
