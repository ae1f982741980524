"""Writing an index: the one way to write a segment, deletion markers, and the commit that names them.

Every write goes through `IndexWriter`: the first build, `--update`, `--rebuild`, uploads through the API, the
watcher, merges and the Ray engine. It writes new files only (a segment's HDF5 rows and FAISS index, a deletion file
per segment that lost rows), then replaces the manifest (the commit point), then removes the files no manifest names.
A write killed at any moment leaves the last committed generation whole; its half-written files are removed by the
next writer. The caller holds the index's lock (indexer/lock.py): one writer at a time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cbir.files import atomic_path, crash_point
from cbir.layout import FAISS, MANIFEST, VECTORS
from cbir.local_features import Packed, pack
from cbir.search import manifest as manifest_mod
from cbir.search import ondisk, store, tuning
from cbir.search.expansion import augment_database, without_self
from cbir.search.manifest import Manifest, SegmentEntry, Settings
from cbir.search.plan import SearchPlan
from cbir.search.searcher import VectorSearch
from cbir.search.segments import Generation, RowsById, Segment, read_deletions
from cbir.version import __version__

log = logging.getLogger(__name__)

OURS = ("seg-*", "faiss-*.ivfdata", "trained-*.faiss", VECTORS, FAISS, f"{MANIFEST}.tmp-*")
FEATURE_BLOCK = 4096  # rows a merge moves at a time when they carry local features (~26 KB each: ~100 MB)


@dataclass(kw_only=True)
class RowBlock:
    """Rows for a new segment, in their stored order."""

    ids: np.ndarray
    paths: list[str]
    vectors: np.ndarray  # the encoder's own rows (float32, L2-normalised)
    mtime_ns: np.ndarray
    size: np.ndarray
    sha256: list[str]
    searched: np.ndarray | None = None  # what search compares (their alpha-DBA), when already made (a merge)
    meta: dict[str, np.ndarray] | None = None  # their metadata columns (cbir.metadata.COLUMNS); None: file times only
    features: Packed | None = None  # their local features (cbir/local_features.py), when the index keeps them

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, rows: np.ndarray) -> RowBlock:
        """These rows only (positions in the block), every column kept."""
        rows = np.asarray(rows, np.int64)
        return RowBlock(ids=self.ids[rows], paths=[self.paths[r] for r in rows], vectors=self.vectors[rows],
                        mtime_ns=self.mtime_ns[rows], size=self.size[rows], sha256=[self.sha256[r] for r in rows],
                        searched=self.searched[rows] if self.searched is not None else None,
                        meta={k: v[rows] for k, v in self.meta.items()} if self.meta is not None else None)


class IndexWriter:
    """One write to an index folder: new segments, deletions, then one commit (a new generation)."""

    def __init__(self, folder: Path, base: Manifest, *, mapper: Callable[..., Iterable[int]] = map,
                 fresh: bool = False) -> None:
        """`base`: the generation this write changes; `fresh`: its rows are all replaced (a rebuild)."""
        self.folder = Path(folder)
        self.base = base
        self.mapper = mapper
        self.fresh = fresh
        self.manifest = replace(base, segments=() if fresh else base.segments)
        self.added: list[SegmentEntry] = []
        self.deleting: dict[str, set[int]] = {}
        self.dropped: set[str] = set()
        self._generation: Generation | None = None
        self._lookups: dict[str, tuple[RowsById, np.ndarray]] = {}

    @property
    def settings(self) -> Settings:
        return self.manifest.settings

    def generation(self) -> Generation:
        """The base generation's segments that this write keeps, opened (for deletions and neighbours)."""
        if self._generation is None:
            kept = replace(self.base, segments=() if self.fresh else self.base.segments)
            self._generation = Generation.open(self.folder, manifest=kept)
        return self._generation

    def new_ids(self, n: int) -> np.ndarray:
        """Ids for n new rows: never used before in this index."""
        start = self.manifest.next_id
        self.manifest = replace(self.manifest, next_id=start + n)
        return np.arange(start, start + n, dtype=np.int64)

    def delete(self, ids: Iterable[int]) -> int:
        """Mark rows deleted (ids unknown or deleted already are ignored); returns how many were live. Reads only the
        segments' id columns: deleting from a 10M-row index reads no vector."""
        ids = np.asarray(sorted(set(int(i) for i in ids)), np.int64)
        if not len(ids) or self.fresh:
            return 0
        todo, found = ids, 0
        for entry in self.manifest.segments:
            if not len(todo):
                break
            lookup, deleted = self._lookup(entry)
            rows = lookup.rows(todo)
            hit = (rows >= 0) & ~np.isin(todo, deleted)
            if hit.any():
                self.deleting.setdefault(entry.name, set()).update(int(i) for i in todo[hit])
                found += int(hit.sum())
                todo = todo[~hit]
        return found

    def _lookup(self, entry: SegmentEntry) -> tuple[RowsById, np.ndarray]:
        if entry.name not in self._lookups:
            self._lookups[entry.name] = (RowsById(store.read_ids(self.folder / entry.vectors)),
                                         read_deletions(self.folder, entry))
        return self._lookups[entry.name]

    def drop(self, names: Iterable[str]) -> None:
        """Remove whole segments from the next generation (their rows were merged into a new one)."""
        self.dropped.update(names)

    def add_segment(self, count: int, blocks: Iterable[RowBlock], *, augment: bool = True,
                    seed: int = 0) -> SegmentEntry | None:
        """Write `count` rows as a new segment (nothing for 0 rows). With alpha-DBA, rows without `searched` vectors
        are augmented with their neighbours among themselves and (`augment`) the rest of the collection."""
        if count == 0:
            return None
        name, self.manifest = self.manifest.next_segment_name()
        others = None
        if augment and self.settings.expansion.dba_k and not self.fresh and self.manifest.segments:
            others = Others(self.generation(), {i for ids in self.deleting.values() for i in ids})
        entry = write_segment(self.folder, name, settings=self.settings, count=count, blocks=blocks,
                              augment_against=others, base_plan=self._on_disk_base(), mapper=self.mapper,
                              seed=seed)
        self.added.append(entry)
        crash_point("segment-written")
        return entry

    def _on_disk_base(self) -> SearchPlan | None:
        """The plan of the on-disk segment new ones are encoded like (its trained index), if there is one. An index
        built before trained indexes were kept gets one now, taken from its first segment's FAISS file."""
        if not self.settings.on_disk:
            return None
        entries = (*self.manifest.segments, *self.added)
        plans = [(e, store.read_plan(self.folder / e.vectors)) for e in entries]
        for _, plan in plans:
            if plan is not None and "trained" in plan.params:
                return plan
        if not plans or plans[0][1] is None:
            return None
        entry, plan = plans[0]
        trained = ondisk.save_trained(ondisk.trained_of(self.folder / entry.faiss), self.folder)
        return replace(plan, params={**plan.params, "trained": trained})

    def commit(self, **changes: object) -> Manifest:
        """Write the deletion files and the new manifest (with `changes` to its other fields), then tidy up."""
        segments = []
        for entry in self.manifest.segments:
            if entry.name in self.dropped:
                continue
            entry = self._with_deletions(entry)
            if entry.live > 0:
                segments.append(entry)
        segments += [self._with_deletions(e) for e in self.added]
        new = replace(self.manifest, segments=tuple(segments), generation=self.base.generation + 1,
                      updated=store.now_iso(), cbir_version=__version__, legacy=False, **changes)  # type: ignore[arg-type]
        manifest_mod.save(self.folder, new)
        remove_unreferenced(self.folder, new)
        if self._generation is not None:
            self._generation.close()
        return new

    def _with_deletions(self, entry: SegmentEntry) -> SegmentEntry:
        gone = self.deleting.get(entry.name)
        if not gone:
            return entry
        before = read_deletions(self.folder, entry)
        ids = np.union1d(before, np.fromiter(gone, np.int64, len(gone)))
        name = f"{entry.name}.del-{self.base.generation + 1:06d}.npy"
        with atomic_path(self.folder / name, suffix=".npy") as tmp:
            np.save(tmp, ids)
        return replace(entry, deletions=name, deleted=len(ids))


def write_segment(folder: Path, name: str, *, settings: Settings, count: int, blocks: Iterable[RowBlock],
                  augment_against: Others | None, base_plan: SearchPlan | None,
                  mapper: Callable[..., Iterable[int]] = map, seed: int = 0) -> SegmentEntry:
    """The segment's rows (HDF5) and its FAISS index, written beside their final names and renamed at the end (not
    yet part of the index: the manifest names it)."""
    started = time.perf_counter()
    vectors_path, faiss_path = folder / f"{name}.h5", folder / f"{name}.faiss"
    with atomic_path(vectors_path) as tmp_vec, atomic_path(faiss_path) as tmp_faiss:
        searched = _write_rows(tmp_vec, settings, count, blocks)
        if settings.on_disk:
            plan = ondisk.build_index(tmp_vec, tmp_faiss, mapper=mapper, base=base_plan, seed=seed)
        else:
            plan = _in_memory(tmp_vec, tmp_faiss, settings, searched, augment_against, seed)
        store.set_attrs(tmp_vec, {"search": json.dumps(plan.to_dict(), sort_keys=True)})
    also = tuple(str(plan.params[k]) for k in ("data", "trained") if k in plan.params)
    log.info(f"segment {name}: {count} rows, {plan.type}, written in {time.perf_counter() - started:.1f} s")
    return SegmentEntry(name=name, vectors=vectors_path.name, faiss=faiss_path.name, rows=count, kind=plan.type,
                        also=also)


def _write_rows(path: Path, settings: Settings, count: int, blocks: Iterable[RowBlock]) -> list[np.ndarray] | None:
    """Stream the blocks into the segment's file; returns their `searched` vectors when every block has them."""
    attrs = {"vector_dtype": settings.vector_dtype, "created": store.now_iso(), "cbir_version": __version__}
    writer = store.VectorWriter(path, int(settings.encoder["dim"]), attrs, dtype=settings.vector_dtype, rows=count)
    searched: list[np.ndarray] | None = []
    first_id: int | None = None
    ids_are_rows = True
    try:
        for block in blocks:
            writer.append(block.vectors, block.paths, block.mtime_ns, block.size, ids=block.ids, sha256=block.sha256,
                          meta=block.meta, features=block.features)
            first_id = int(block.ids[0]) if first_id is None and len(block) else first_id
            ids_are_rows &= bool(np.array_equal(block.ids, np.arange(writer.count - len(block), writer.count)))
            if searched is not None:
                searched = searched + [block.searched] if block.searched is not None else None
        writer.close({"ids_are_rows": ids_are_rows})
    finally:
        writer.abort()
    return searched


def _in_memory(tmp_vec: Path, tmp_faiss: Path, settings: Settings, searched: list[np.ndarray] | None,
               augment_against: Others | None, seed: int) -> SearchPlan:
    """The segment's in-memory index (tuned by its size), over its alpha-DBA rows when the index uses DBA."""
    rows = store.read(tmp_vec)
    assert rows.vectors is not None
    ids = np.asarray(rows.ids)
    dba = settings.expansion.dba_k
    if dba and searched:
        augmented = np.concatenate(searched)
    elif dba and (len(rows) > 1 or augment_against is not None):
        own = VectorSearch(*tuning.build(rows.vectors, ids, index_type="flat"))
        augmented = augment_database(rows.vectors, _neighbours(own, rows.vectors, augment_against, dba),
                                     settings.expansion.dba_alpha)
    else:
        augmented = None
    if augmented is not None:
        store.replace_vectors(tmp_vec, augmented)
    index, plan = tuning.build(rows.vectors if augmented is None else augmented, ids,
                               index_type=settings.index_type, seed=seed)
    VectorSearch(index, plan).save(tmp_faiss)
    return plan


@dataclass
class Others:
    """The rest of the collection a new segment's rows are augmented against: a generation, without the rows this
    write deletes (a changed file's old row is not its neighbour)."""

    generation: Generation
    deleted: set[int]

    def search(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.deleted:
            return self.generation.search(rows, k)
        gone = np.fromiter(self.deleted, np.int64, len(self.deleted))
        return self.generation.search(rows, k, lambda seg: ~np.isin(np.asarray(seg.store.ids), gone))


def _neighbours(own: VectorSearch, raw: np.ndarray, others: Others | None, k: int):
    """alpha-DBA neighbours of new rows: their top-k among themselves and the rest of the collection, with the
    neighbours' own (encoder) vectors."""

    def find(rows: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        s, pos = own.search(rows, min(k + 1, len(raw)))
        s, pos = without_self(s, pos, start, k)
        vecs = np.where((pos >= 0)[..., None], raw[np.clip(pos, 0, None)], 0.0)
        if others is not None:
            s2, ids2 = others.search(rows, k)
            v2 = np.zeros((*ids2.shape, raw.shape[1]), np.float32)
            valid = ids2 >= 0
            v2[valid] = raw_vectors_of(others.generation, ids2[valid])
            s, vecs = np.hstack([s, s2]), np.concatenate([vecs, v2], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(s, order, 1)
        return np.where(np.isfinite(best), best, 0.0), np.take_along_axis(vecs, order[..., None], 1)

    return find


def raw_vectors_of(gen: Generation, ids: np.ndarray) -> np.ndarray:
    """The encoder's own vectors of `ids` (an index with alpha-DBA keeps them beside the searched ones)."""
    return np.asarray(gen.gather(np.asarray(ids, np.int64), lambda s, rows: list(s.raw_vectors(rows))), np.float32)


def live_blocks(gen: Generation, segments: list[Segment], *, block: int = 65_536,
                with_searched: bool = True) -> Iterator[RowBlock]:
    """The live rows of `segments` in id order, as blocks for a merged segment (ids, vectors, columns and local
    features kept)."""
    for seg in segments:
        rows = seg.live_rows()
        step = block if not store.keeps_features(seg.store) else FEATURE_BLOCK
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            s = seg.store
            searched = seg.vectors(part) if with_searched else None
            kept = seg.features(part)
            yield RowBlock(ids=s.ids_at(part), paths=_paths(seg, part), vectors=seg.raw_vectors(part),
                           mtime_ns=np.asarray(s.mtime_ns)[part], size=np.asarray(s.size)[part],
                           sha256=_column(s.sha256, part), searched=searched, meta=seg.meta(part),
                           features=pack(kept) if any(f is not None for f in kept) else None)


def _paths(seg: Segment, rows: np.ndarray) -> list[str]:
    paths = seg.store.paths
    return paths.take(rows) if isinstance(paths, store.Strings) else [paths[int(r)] for r in rows]


def _column(values, rows: np.ndarray) -> list[str]:
    if values is None:
        return [""] * len(rows)
    return values.take(rows) if isinstance(values, store.Strings) else [values[int(r)] for r in rows]


def remove_unreferenced(folder: Path, manifest: Manifest) -> None:
    """Delete the index's own files that the committed manifest does not name (left by a killed write, or replaced).
    A server still reading one keeps its open copy until it moves to the new generation."""
    keep = manifest.files()
    for pattern in OURS:
        for f in folder.glob(pattern):
            if f.name not in keep and f.is_file():
                f.unlink(missing_ok=True)


def merge_segments(folder: Path, manifest: Manifest, names: list[str], *, mapper: Callable[..., Iterable[int]] = map,
                   again: bool = False) -> Manifest:
    """Merge the named segments' live rows into one new segment (ids kept, deleted rows dropped, nothing embedded)
    and commit. `again`: the rows are augmented (alpha-DBA) and the search index tuned anew, as in a new index
    (compacting every segment); otherwise rows keep their searched vectors."""
    writer = IndexWriter(folder, manifest, mapper=mapper)
    gen = writer.generation()
    chosen = [s for s in gen.segments if s.name in names]
    others = [s for s in gen.segments if s.name not in names]
    count = sum(len(s) for s in chosen)
    writer.add_segment(count, live_blocks(gen, chosen, with_searched=not again), augment=again and bool(others))
    crash_point("merge-written")
    writer.drop(names)
    return writer.commit()
