"""One generation of an index, opened for search: its segments (rows, FAISS index, deletions); searches fan out over
them and merge, lookups by id find the segment and row.

A `Generation` never changes: a write makes a new one (`Generation.open(folder, previous=...)` reuses the segments
that did not change, so a server picking up a new generation opens only the new files).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir import metadata
from cbir.errors import CbirError
from cbir.local_features import Features
from cbir.search import filters, ondisk, ondisk_group, store, tuning
from cbir.search import manifest as manifest_mod
from cbir.search.manifest import Manifest, SegmentEntry
from cbir.search.plan import ONDISK
from cbir.search.searcher import Allowed, VectorSearch

log = logging.getLogger(__name__)

RowFilter = Callable[["Segment"], np.ndarray | None]  # a segment -> bool per row (True: may be answered), or None


class RowsById:
    """id -> row of a segment: arithmetic when ids are the row numbers (a `range`), else a sorted lookup."""

    def __init__(self, ids: np.ndarray | range) -> None:
        self.range = ids if isinstance(ids, range) else None
        if self.range is None:
            ids = np.asarray(ids, np.int64)
            self.order = np.argsort(ids, kind="stable")
            self.sorted = ids[self.order]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (-1 where unknown)."""
        ids = np.asarray(ids, np.int64)
        if self.range is not None:
            return np.where((ids >= 0) & (ids < len(self.range)), ids, -1)
        if not len(self.sorted):
            return np.full(len(ids), -1, np.int64)
        at = np.clip(np.searchsorted(self.sorted, ids), 0, len(self.sorted) - 1)
        return np.where(self.sorted[at] == ids, self.order[at], -1)


class Segment:
    """A segment's rows and FAISS index, and which of its rows are deleted in this generation."""

    def __init__(self, entry: SegmentEntry, rows: store.Store, search: VectorSearch, deleted: np.ndarray) -> None:
        self.entry = entry
        self.store = rows
        self.search = search
        self.lookup = RowsById(rows.ids)
        self.deleted = deleted  # sorted ids
        self.live: Allowed | None = None  # None: every row is live
        if len(deleted):
            mask = np.ones(len(rows), bool)
            at = self.lookup.rows(deleted)
            mask[at[at >= 0]] = False
            self.live = Allowed(mask)
        self._last: tuple[np.ndarray, Allowed] | None = None  # the latest filter's mask and what was made of it

    @property
    def name(self) -> str:
        return self.entry.name

    def __len__(self) -> int:
        return len(self.store) - len(self.deleted)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` that are in this segment and live (-1 otherwise)."""
        rows = self.lookup.rows(ids)
        if self.live is not None:
            rows = np.where((rows >= 0) & self.live.mask[np.clip(rows, 0, None)], rows, -1)
        return rows

    def id_of(self, path: str) -> int | None:
        """The live id of `path` in this segment, or None (its path -> row table is made once per segment file)."""
        table = self.store.by_path
        if table is None:  # kept on the rows, which every generation of this file shares
            paths = self.store.paths
            table = {p: r for r, p in enumerate(paths[:] if isinstance(paths, store.Strings) else paths)}
            self.store.by_path = table
        row = table.get(path)
        if row is None or (self.live is not None and not self.live.mask[row]):
            return None
        return int(self.store.ids_at(np.array([row]))[0])

    def live_rows(self) -> np.ndarray:
        return self.live.rows() if self.live is not None else np.arange(len(self.store))

    def allowed(self, row_filter: RowFilter | None) -> Allowed | None:
        """The rows a search may answer: the live ones, narrowed by a filter."""
        if row_filter is None:
            return self.live
        mask = row_filter(self)
        if mask is None:
            return self.live
        last = self._last
        if last is not None and last[0] is mask:  # the same filter again (kept by cbir.search.filters): its row
            return last[1]  # list and selector bitmap are made already
        allowed = Allowed(mask) & self.live if self.live is not None else Allowed(mask)
        if not mask.flags.writeable:  # a shared, unchanging mask: safe to know again by identity
            self._last = (mask, allowed)
        return allowed

    def find(self, queries: np.ndarray, k: int, row_filter: RowFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each [B, k], of this segment's allowed rows."""
        allowed = self.allowed(row_filter)
        if allowed is not None and allowed.count == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        scores, rows = self.search.search(queries, k, allowed)
        return scores, np.where(rows >= 0, self.store.ids_at(np.clip(rows, 0, None)), -1)

    def meta(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The metadata columns (cbir.metadata.COLUMNS) of rows."""
        return {name: column[np.asarray(rows, np.int64)] for name, column in self.store.meta().items()}

    def columns(self) -> filters.Columns:
        """This segment's rows as filters see them (made once per segment file, shared by its generations)."""
        if self.store.filter_columns is None:
            paths = self.store.paths
            self.store.filter_columns = filters.Columns(paths[:] if isinstance(paths, store.Strings) else paths,
                                                        self.store.meta())
        return self.store.filter_columns

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Searched vectors of rows, float32."""
        assert self.store.vectors is not None
        return np.asarray(self.store.vectors[np.asarray(rows)], np.float32)

    def raw_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The encoder's own vectors of rows (with alpha-DBA they differ from the searched ones), float32."""
        if not self.store.has_raw:
            return self.vectors(rows)
        return store.read_rows(self.store, "raw_vectors", rows)

    def features(self, rows: np.ndarray) -> list[Features | None]:
        """The local features its file keeps for rows (None where it keeps none: an index made without them)."""
        return store.read_features(self.store, rows)

    def with_deletions(self, folder: Path, entry: SegmentEntry) -> Segment:
        """The same files with another generation's deletions (nothing read again but the deletion file)."""
        return Segment(entry, self.store, self.search, read_deletions(folder, entry))

    @classmethod
    def open(cls, folder: Path, entry: SegmentEntry, *, gpu: bool = False) -> Segment:
        if entry.kind == ONDISK:
            return cls._open_on_disk(folder, entry)
        rows = store.read(folder / entry.vectors, vectors=True)
        search = _load_search(folder, entry, rows, gpu)
        return cls(entry, rows, search, read_deletions(folder, entry))

    @classmethod
    def _open_on_disk(cls, folder: Path, entry: SegmentEntry) -> Segment:
        """Larger than memory: vectors and ids memory-mapped, paths read per row, FAISS lists on disk. Opening reads
        none of them; a query reads its candidates' rows to re-rank them."""
        rows = store.open_lazy(folder / entry.vectors)
        path = folder / entry.faiss
        if not path.is_file():
            raise CbirError(f"{path} is missing; run cbir compact {folder} to build it again from the vectors")
        index = ondisk.load(path)
        if index.ntotal != len(rows) or index.d != rows.dim:
            raise CbirError(f"{path} does not match {entry.vectors}; run cbir compact {folder} to build it again")
        assert rows.vectors is not None
        search = VectorSearch(index, rows.plan, exact_rows=ondisk.rows_reader(rows.vectors))
        return cls(entry, rows, search, read_deletions(folder, entry))


def read_deletions(folder: Path, entry: SegmentEntry) -> np.ndarray:
    if entry.deletions is None:
        return np.zeros(0, np.int64)
    try:
        return np.sort(np.load(folder / entry.deletions).astype(np.int64))
    except (OSError, ValueError) as exc:
        raise CbirError(f"cannot read {folder / entry.deletions} ({exc}): the index is damaged; rebuild it with "
                        "cbir index --rebuild") from exc


def _load_search(folder: Path, entry: SegmentEntry, rows: store.Store, gpu: bool) -> VectorSearch:
    """The segment's FAISS index, checked against its rows; missing, unreadable or not matching: built again from the
    vectors (it is derived data), exactly, with a warning."""
    assert rows.vectors is not None
    exact_rows = rows.vectors.__getitem__
    path = folder / entry.faiss
    problem = "is missing"
    if path.is_file():
        try:
            search = VectorSearch.load(path, rows.plan, gpu=gpu, exact_rows=exact_rows)
            if _agrees(search, rows):
                return search
            problem = "does not match its vectors"
        except CbirError as exc:
            problem = f"cannot be read ({str(exc).rpartition(': ')[2]})"
    warnings.warn(f"{path} {problem}; searching {entry.vectors} exactly instead (cbir compact builds it again)",
                  stacklevel=3)
    log.warning(f"{path} {problem}; rebuilt from {entry.vectors} (exact search)")
    return VectorSearch(tuning.flat(rows.vectors, np.asarray(rows.ids)), gpu=gpu, exact_rows=exact_rows)


def _agrees(search: VectorSearch, rows: store.Store) -> bool:
    """The FAISS file belongs to these rows: same count, dimension, ids, and (exact) a sample of rows."""
    if search.ntotal != len(rows) or search.dim != rows.dim:
        return False
    if search.ids is not None and not np.array_equal(search.ids, np.asarray(rows.ids)):
        return False
    if not search.exact:
        return True
    assert rows.vectors is not None
    atol = 2e-3 if rows.float16 else 1e-3
    for row in np.linspace(0, len(rows) - 1, num=min(8, len(rows)), dtype=np.int64):
        if not np.allclose(search.reconstruct(int(row)), rows.vectors[row], atol=atol):
            return False
    return True


@dataclass(frozen=True)
class Located:
    """Where ids are: segment number and row per id (-1 for an unknown or deleted id)."""

    segment: np.ndarray
    row: np.ndarray

    @property
    def found(self) -> np.ndarray:
        return self.segment >= 0


class Generation:
    """The segments a manifest names, opened: what one search, one request, one page sees."""

    def __init__(self, folder: Path, manifest: Manifest, segments: Sequence[Segment]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.segments = list(segments)
        self._ids: np.ndarray | range | None = None

    @classmethod
    def open(cls, folder: Path, *, gpu: bool = False, previous: Generation | None = None,
             manifest: Manifest | None = None) -> Generation:
        """Open the folder's current generation (or `manifest`'s), reusing `previous`'s unchanged segments."""
        manifest = manifest or manifest_mod.load(folder)
        known = {(s.entry.vectors, s.entry.faiss): s for s in (previous.segments if previous else [])}
        segments = []
        for entry in manifest.segments:
            same = known.get((entry.vectors, entry.faiss))
            if same is None:
                segments.append(Segment.open(folder, entry, gpu=gpu))
            elif same.entry.deletions != entry.deletions:
                segments.append(same.with_deletions(folder, entry))
            else:
                segments.append(Segment(entry, same.store, same.search, same.deleted))
        return cls(folder, manifest, segments)

    def close(self) -> None:
        for s in self.segments:
            s.store.close()

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def dim(self) -> int:
        return int(self.manifest.settings.encoder["dim"])

    @property
    def lazy(self) -> bool:
        """Some segment is read from disk per query (an on-disk index)."""
        return any(s.store.lazy for s in self.segments)

    def search(self, queries: np.ndarray, k: int, row_filter: RowFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each [B, k], best first over every segment; missing slots have id -1 and score -inf."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise CbirError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        shared = ondisk_group.groups(self.segments) if row_filter is None else []  # one coarse pass for these
        grouped = {n for group in shared for n in group}
        parts = [ondisk_group.find([self.segments[n] for n in group], q, k) for group in shared]
        parts += [s.find(q, k, row_filter) for n, s in enumerate(self.segments) if n not in grouped]
        if not parts:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        scores, ids = np.hstack([p[0] for p in parts]), np.hstack([p[1] for p in parts])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def id_of(self, path: str) -> int | None:
        """The id of the live row of `path` (relative to the root), or None."""
        for seg in reversed(self.segments):  # newest first: an older segment may hold a deleted version
            found = seg.id_of(path)
            if found is not None:
                return found
        return None

    def locate(self, ids: np.ndarray) -> Located:
        ids = np.asarray(ids, np.int64)
        seg, row = np.full(len(ids), -1, np.int64), np.full(len(ids), -1, np.int64)
        for n, s in enumerate(self.segments):
            todo = np.flatnonzero(seg < 0)
            if not len(todo):
                break
            found = s.rows_of(ids[todo])
            hit = found >= 0
            seg[todo[hit]], row[todo[hit]] = n, found[hit]
        return Located(seg, row)

    def gather(self, ids: np.ndarray, read: Callable[[Segment, np.ndarray], Sequence]) -> list:
        """read(segment, rows) for the ids, back in the order of `ids`; an unknown id is an error."""
        where = self.locate(ids)
        if not where.found.all():
            raise KeyError(int(np.asarray(ids)[np.argmin(where.found)]))
        out: list = [None] * len(ids)
        for n in sorted(set(where.segment.tolist())):  # not np.unique: its first call imports numpy.ma (18 ms)
            at = np.flatnonzero(where.segment == n)
            for i, value in zip(at, read(self.segments[n], where.row[at]), strict=True):
                out[int(i)] = value
        return out

    def vectors_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The searched vectors of `ids` [n, D] float32 (KeyError for an unknown or deleted id)."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.gather(ids, lambda s, rows: list(s.vectors(rows))), np.float32).reshape(-1, self.dim)

    def features_of(self, ids: Sequence[int] | np.ndarray) -> list[Features | None]:
        """The local features of `ids` as their segments keep them (None for a row kept without)."""
        return self.gather(np.asarray(ids, np.int64), lambda s, rows: s.features(rows))

    def paths_of(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The paths of `ids` (one read per segment of an on-disk index's path column)."""
        return self.gather(np.asarray(ids, np.int64), _paths)

    def meta_of(self, ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The metadata columns of `ids`, in their order."""
        ids = np.asarray(ids, np.int64)
        rows = self.gather(ids, lambda s, r: [{k: v[j] for k, v in s.meta(r).items()} for j in range(len(r))])
        return {name: np.array([row[name] for row in rows], dtype=object if dt == "U" else dt)
                for name, dt in metadata.COLUMNS.items()}

    def column(self, name: str, ids: Sequence[int] | np.ndarray) -> list:
        """Any per-row column (size, mtime_ns, sha256, ...) of `ids`."""
        return self.gather(np.asarray(ids, np.int64), lambda s, rows: [getattr(s.store, name)[int(r)] for r in rows])

    def ids(self) -> np.ndarray | range:
        """Every live id, ascending (a `range` for an on-disk index of one segment with nothing deleted: no memory)."""
        if self._ids is None:
            single = self.segments[0] if len(self.segments) == 1 else None
            if single is not None and isinstance(single.store.ids, range) and single.live is None:
                self._ids = single.store.ids
            else:
                parts = [np.asarray(s.store.ids)[s.live_rows()] for s in self.segments]
                self._ids = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return self._ids


def _paths(segment: Segment, rows: np.ndarray) -> list[str]:
    paths = segment.store.paths
    if isinstance(paths, store.Strings):
        return paths.take(rows)
    return [paths[int(r)] for r in rows]
