"""One segment's rows (`seg-NNNNNN.h5`; `vectors.h5` in an index made before segments): embeddings and the
metadata of each row, in one HDF5 file. Written once, never changed after it is named in a manifest (manifest.py).

Layout (format 1):
    vectors     float32 [N, D]  L2-normalised rows, as searched (optionally float16 on disk)
    raw_vectors float32 [N, D]  the encoder's own rows, when `vectors` hold their alpha-DBA (see expansion.py)
    paths       utf-8    [N]    relative to the index's root
    ids         int64    [N]    global, stable ids (never reused); FAISS answers row positions, mapped to these
    mtime_ns    int64    [N]
    size        int64    [N]
    sha256      utf-8    [N]    content hash (byte-identical duplicates, renames, --update --verify)
    meta/<column>        [N]    what is known of each picture (cbir.metadata.COLUMNS: taken_ns int64, taken_exif
                                bool, make, model utf-8, lat, lon float64 (NaN: none), width, height int32, own_tags,
                                tags utf-8 joined by line breaks); absent in segments made before it was kept
    skipped/path, skipped/reason   utf-8 [M]   (files an index made before segments left out; now in the manifest)
    keypoints/offsets  int64 [N + 1], keypoints/sizes uint16 [N, 2], keypoints/xy float16 [K, 2],
    keypoints/descriptors uint8 [K, 128]   each row's local features (cbir/local_features.py): rows offsets[i] to
                                 offsets[i + 1] of the keypoint table, sizes (0, 0) for none; absent when none kept
    attrs: format, dim, count, complete, contiguous, vector_dtype (float32|float16), created, cbir_version,
           search (JSON: the segment's search plan and its measured recall), ids_are_rows;
           in a `vectors.h5` made before segments also the index's own facts (encoder, encoder_config, root,
           expansion, words, preset, seconds, skipped_count), read once into its manifest (manifest.from_legacy).

Rows are appended batch by batch, so memory does not grow with the collection; `complete` is set only when the
writer closes normally, and readers refuse a file without it. When the row count is known before writing (it always
is for a segment), the numeric columns are stored contiguously (attr `contiguous`), and `open_lazy` memory-maps
them: a segment of 10 million images opens without reading its vectors, ids or paths.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cbir import metadata
from cbir.errors import CbirError
from cbir.files import release_reserved, reserve, writing
from cbir.local_features import DIM as KEYPOINT_DIM
from cbir.local_features import KEEP, KEEP_SIDE, Features, Packed, pack
from cbir.search.plan import SearchPlan

FORMAT = 1
STR = h5py.string_dtype("utf-8")
ROW_BYTES = 768  # a row's facts at most, about: id, mtime, size, sha256 (hex), its path, metadata columns, HDF5's own


def bytes_needed(rows: int, dim: int, itemsize: int = 4, features: bool = False) -> int:
    """About how large (at most) a vectors file of `rows` rows is, with room for KEEP keypoints a row if `features`."""
    kept = KEEP * (KEYPOINT_DIM + 4) + 12 if features else 0
    return rows * (dim * itemsize + ROW_BYTES + kept) + 256 * 1024


def _translated(method: Callable[..., Any]) -> Callable[..., Any]:
    """A writer's method whose failed writes (disk full, quota, read-only, permission) are a WriteError."""
    @functools.wraps(method)
    def wrapper(self: VectorWriter, *args: Any, **kwargs: Any) -> Any:
        with writing(self.path, needed=self.bytes_needed):
            return method(self, *args, **kwargs)

    return wrapper


META = "meta"  # the group of the metadata columns


class VectorWriter:
    """Streams rows into a new vectors file."""

    def __init__(self, path: Path, dim: int, attrs: dict[str, Any], chunk_rows: int = 1024,
                 dtype: str = "float32", rows: int | None = None) -> None:
        """`rows`: the exact number of rows to come, if known: numeric columns are then contiguous (mappable)."""
        self.path = Path(path)
        self.dim = dim
        self.count = 0
        self.rows = rows
        self.itemsize = np.dtype(dtype).itemsize
        self._create(attrs, chunk_rows, dtype)

    def bytes_needed(self) -> int | None:
        if self.rows is None:
            return None
        return bytes_needed(self.rows, self.dim, self.itemsize, features="keypoints" in self.f)

    @_translated
    def _create(self, attrs: dict[str, Any], chunk_rows: int, dtype: str) -> None:
        dim, rows = self.dim, self.rows
        self.f = h5py.File(self.path, "w")
        if rows is not None:  # a full disk fails here, before HDF5 has written anything it cannot finish
            reserve(self.path, bytes_needed(rows, dim, self.itemsize))
        numeric = (("vectors", dtype, (dim,)), ("ids", "int64", ()), ("mtime_ns", "int64", ()), ("size", "int64", ()))
        for name, dt, tail in numeric:
            if rows is None:
                self.f.create_dataset(name, (0, *tail), dtype=dt, maxshape=(None, *tail), chunks=(chunk_rows, *tail))
            else:
                self.f.create_dataset(name, (rows, *tail), dtype=dt)
        for name in ("paths", "sha256"):
            self.f.create_dataset(name, (0,), dtype=STR, maxshape=(None,), chunks=(chunk_rows,))
        meta = self.f.create_group(META)
        for name, dt in metadata.COLUMNS.items():
            if dt == "U":
                meta.create_dataset(name, (0,), dtype=STR, maxshape=(None,), chunks=(chunk_rows,))
            elif rows is None:
                meta.create_dataset(name, (0,), dtype=dt, maxshape=(None,), chunks=(chunk_rows,))
            else:
                meta.create_dataset(name, (rows,), dtype=dt)
        g = self.f.create_group("skipped")
        for name in ("path", "reason"):
            g.create_dataset(name, (0,), dtype=STR, maxshape=(None,), chunks=(256,))
        for key, value in attrs.items():
            self.f.attrs[key] = value
        self.f.attrs["format"] = FORMAT
        self.f.attrs["dim"] = dim
        self.f.attrs["complete"] = False

    @_translated
    def append(self, vectors: np.ndarray, paths: Sequence[str], mtime_ns: Sequence[int], sizes: Sequence[int],
               ids: Sequence[int] | None = None, sha256: Sequence[str] | None = None, *,
               meta: dict[str, np.ndarray] | None = None, features: Packed | None = None) -> None:
        """Rows at the end; `meta`: their metadata columns (None: only their file times are known); `features`: their
        local features (cbir/local_features.py), if kept."""
        n = len(paths)
        if n == 0:
            return
        if vectors.shape != (n, self.dim):
            raise ValueError(f"expected vectors of shape ({n}, {self.dim}), got {vectors.shape}")
        if ids is None:
            ids = range(self.count, self.count + n)
        start, stop = self.count, self.count + n
        columns = {"vectors": vectors, "paths": list(paths), "ids": np.asarray(ids, np.int64),
                   "mtime_ns": np.asarray(mtime_ns, np.int64), "size": np.asarray(sizes, np.int64),
                   "sha256": list(sha256) if sha256 is not None else [""] * n}
        if self.rows is not None and stop > self.rows:
            raise ValueError(f"more rows than the {self.rows} announced")
        meta = meta if meta is not None else metadata.unknown_columns(mtime_ns)
        columns.update({f"{META}/{name}": meta[name].tolist() if dt == "U" else np.asarray(meta[name], dt)
                        for name, dt in metadata.COLUMNS.items()})
        for name, data in columns.items():
            ds = self.f[name]
            if ds.maxshape[0] is None:
                ds.resize(stop, axis=0)
            ds[start:stop] = data
        self._append_features(start, stop, features)
        self.count = stop

    def _append_features(self, start: int, stop: int, features: Packed | None) -> None:
        """The ragged keypoint table (group `keypoints`: xy, descriptors, offsets [N + 1], sizes [N, 2]), made when
        the first rows with features come (rows before them have none)."""
        if features is None and "keypoints" not in self.f:
            return
        if "keypoints" not in self.f:
            self._keypoint_table(start)
        g = self.f["keypoints"]
        total = int(g["offsets"][start])
        features = pack([None] * (stop - start)) if features is None else _capped(features)
        if len(features) != stop - start:
            raise ValueError(f"features for {len(features)} rows, {stop - start} rows appended")
        added = len(features.xy)
        for name in ("offsets", "sizes", "xy", "descriptors"):
            if g[name].maxshape[0] is None:
                g[name].resize({"offsets": stop + 1, "sizes": stop}.get(name, total + added), axis=0)
        g["offsets"][start + 1:stop + 1] = total + features.offsets[1:]
        g["sizes"][start:stop] = features.sizes
        if added:
            g["xy"][total:total + added] = features.xy
            g["descriptors"][total:total + added] = features.descriptors

    def _keypoint_table(self, start: int) -> None:
        """With the row count known, the columns are contiguous and sized for KEEP keypoints a row: written straight to
        the file, so a write that fails (a full disk) fails there and then, not later in HDF5's chunk cache (whose
        failed flushes at close crashed the process). Otherwise chunked and grown as rows come."""
        if self.rows is not None:
            reserve(self.path, bytes_needed(self.rows, self.dim, self.itemsize, features=True))
        g = self.f.create_group("keypoints")
        g.attrs["side"], g.attrs["keep"] = KEEP_SIDE, KEEP
        shapes = {"offsets": ((), "int64"), "sizes": ((2,), "uint16"), "xy": ((2,), "float16"),
                  "descriptors": ((KEYPOINT_DIM,), "uint8")}
        known = {"offsets": None if self.rows is None else self.rows + 1, "sizes": self.rows,
                 "xy": None if self.rows is None else self.rows * KEEP}
        known["descriptors"] = known["xy"]
        for name, (tail, dtype) in shapes.items():
            if known[name] is not None:
                g.create_dataset(name, (known[name], *tail), dtype=dtype)
            else:
                first = {"offsets": start + 1, "sizes": start}.get(name, 0)
                g.create_dataset(name, (first, *tail), dtype=dtype, maxshape=(None, *tail), chunks=(4096, *tail))

    @_translated
    def add_skipped(self, path: str, reason: str) -> None:
        g = self.f["skipped"]
        n = g["path"].shape[0]
        for name, value in (("path", path), ("reason", reason)):
            g[name].resize(n + 1, axis=0)
            g[name][n] = value

    @_translated
    def close(self, extra_attrs: dict[str, Any] | None = None) -> None:
        """Mark the file complete and close it; only a file closed this way is ever opened for search."""
        if self.rows is not None and self.count != self.rows:
            raise ValueError(f"{self.count} rows written, {self.rows} announced")
        for key, value in (extra_attrs or {}).items():
            self.f.attrs[key] = value
        self.f.attrs["count"] = self.count
        self.f.attrs["contiguous"] = self.rows is not None
        self.f.attrs["complete"] = True
        self.f.close()
        release_reserved(self.path)

    def abort(self) -> None:
        """Let go of the file whatever state a failed write left it in (it is deleted next: no second error)."""
        with contextlib.suppress(OSError, RuntimeError, ValueError, AttributeError):
            if self.f.id.valid:
                self.f.close()


@dataclass(kw_only=True)
class Store:
    """Everything in a segment's file, read into memory (the vectors themselves only when asked)."""

    path: Path
    attrs: dict[str, Any]
    paths: Sequence[str]
    ids: np.ndarray
    mtime_ns: np.ndarray
    size: np.ndarray
    skipped: list[tuple[str, str]]
    sha256: Sequence[str] | None = None  # content hash per file (absent in files from before it was recorded)
    vectors: np.ndarray | None = field(default=None, repr=False)
    raw_vectors: np.ndarray | None = field(default=None, repr=False)  # with DBA: the encoder's rows, if asked
    handle: h5py.File | None = field(default=None, repr=False)  # open_lazy: the file its columns read from
    plan: SearchPlan | None = None  # the segment's search plan (attrs["search"], parsed once)
    has_raw: bool = False  # the file keeps the encoder's own rows beside the searched ones (alpha-DBA)
    _meta: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)
    filter_columns: Any = field(default=None, init=False, repr=False)  # cbir.search.filters.Columns, made once
    by_path: dict[str, int] | None = field(default=None, repr=False)  # path -> row, made when first asked

    def ids_at(self, rows: np.ndarray) -> np.ndarray:
        """The ids of rows, int64. Where ids are the rows (`range`), no array of every id is made: np.asarray of a
        10M-row segment's range took ~0.5 s, on every search."""
        rows = np.asarray(rows, np.int64)
        if isinstance(self.ids, range):
            return rows * self.ids.step + self.ids.start
        return np.asarray(self.ids)[rows]

    def __post_init__(self) -> None:
        if self.plan is None and "search" in self.attrs:
            self.plan = SearchPlan.from_dict(json.loads(self.attrs["search"]))

    @property
    def lazy(self) -> bool:
        return self.handle is not None

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def float16(self) -> bool:
        return self.attrs.get("vector_dtype", "float32") == "float16"

    def close(self) -> None:
        if self.handle is not None and self.handle.id.valid:
            self.handle.close()

    def meta(self) -> dict[str, np.ndarray]:
        """The metadata columns (cbir.metadata.COLUMNS), read on first use (a search without filters never reads
        them); a segment made before they were kept: file times only."""
        if self._meta is None:
            f = self.handle if self.handle is not None and self.handle.id.valid else h5py.File(self.path, "r")
            try:
                if META not in f:
                    self._meta = metadata.unknown_columns(np.asarray(self.mtime_ns))
                else:
                    self._meta = {name: np.array(_strings(f[META][name]), dtype=object) if dt == "U" else
                                  np.asarray(f[META][name][()], dt) for name, dt in metadata.COLUMNS.items()}
            except OSError as exc:
                raise CbirError(f"cannot read the metadata of {self.path}: {exc}") from exc
            finally:
                if f is not self.handle:
                    f.close()
        return self._meta

    def __len__(self) -> int:
        return len(self.paths)


def _strings(ds: h5py.Dataset) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else s for s in ds[()]]


def read(path: Path, vectors: bool = True, raw: bool = False) -> Store:
    """The file's columns in memory; `vectors` the searched rows, `raw` also the encoder's own rows (updates)."""
    path = Path(path)
    if not path.is_file():
        raise CbirError(f"no vectors file at {path}")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            if not attrs.get("complete", False):
                raise CbirError(f"{path} is incomplete (its indexing run did not finish); re-run cbir index")
            if int(attrs.get("format", 0)) > FORMAT:
                raise CbirError(f"{path} was written by a newer cbir (format {attrs['format']}); upgrade cbir")
            store = Store(
                path=path,
                attrs=attrs,
                paths=_strings(f["paths"]),
                ids=f["ids"][()].astype(np.int64),
                mtime_ns=f["mtime_ns"][()],
                size=f["size"][()],
                skipped=list(zip(_strings(f["skipped/path"]), _strings(f["skipped/reason"]), strict=True)),
                sha256=_strings(f["sha256"]) if "sha256" in f else None,
                has_raw="raw_vectors" in f,
            )
            if vectors:
                store.vectors = np.ascontiguousarray(f["vectors"][()], dtype=np.float32)
            if raw:
                source = f["raw_vectors"] if "raw_vectors" in f else f["vectors"]
                store.raw_vectors = np.ascontiguousarray(source[()], dtype=np.float32)
    except OSError as exc:
        raise CbirError(f"cannot read {path}: {exc}") from exc
    n = len(store.paths)
    if not (len(store.ids) == len(store.mtime_ns) == len(store.size) == n == int(attrs.get("count", n))):
        raise CbirError(f"{path} is inconsistent: its columns have different lengths")
    if store.vectors is not None and store.vectors.shape != (n, store.dim):
        raise CbirError(f"{path} is inconsistent: vectors {store.vectors.shape} for {n} paths of dim {store.dim}")
    return store


class Strings(Sequence[str]):
    """A string column read row by row from its open file (a 10M-row column is never read whole)."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return int(self.ds.shape[0])

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [_text(v) for v in self.ds[row]]
        if not -len(self) <= row < len(self):
            raise IndexError(row)
        return _text(self.ds[row % len(self)])

    def take(self, rows: np.ndarray) -> list[str]:
        """Several rows at once (read in file order)."""
        order = np.argsort(rows)
        got = self.ds[np.asarray(rows)[order]] if len(rows) else []
        out = [""] * len(rows)
        for j, v in zip(order, got, strict=True):
            out[int(j)] = _text(v)
        return out


def _text(v: bytes | str) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else v


def _mapped(path: Path, ds: h5py.Dataset) -> np.ndarray:
    """A read-only memory map of a contiguous, uncompressed dataset (HDF5 stores it as one run of bytes)."""
    offset = ds.id.get_offset()
    if offset is None or ds.compression is not None:
        raise CbirError(f"{path}: column {ds.name} is not stored contiguously; rebuild the index with --on-disk")
    return np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)


def read_attrs(path: Path) -> dict[str, Any]:
    """The file's attributes only (cheap at any size)."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _text(v) if isinstance(v, bytes) else v for k, v in f.attrs.items()}
    except OSError as exc:
        raise CbirError(f"cannot read {path}: {exc}") from exc


def open_lazy(path: Path) -> Store:
    """The file opened without reading its columns: vectors, ids, sizes memory-mapped, strings read per row.

    For indexes larger than memory. Ids that are 0..N-1 in row order (a fresh build) are a `range`: no memory.
    """
    path = Path(path)
    attrs = read_attrs(path)
    if not attrs.get("complete", False):
        raise CbirError(f"{path} is incomplete (its indexing run did not finish); re-run cbir index")
    f = h5py.File(path, "r")
    n = int(f["paths"].shape[0])
    ids = _mapped(path, f["ids"])
    if attrs.get("ids_are_rows", False):
        ids = range(n)  # type: ignore[assignment]
    skipped = list(zip(Strings(f["skipped/path"])[:], Strings(f["skipped/reason"])[:], strict=True))
    store = Store(path=path, attrs=attrs, paths=Strings(f["paths"]), ids=ids,  # type: ignore[arg-type]
                  mtime_ns=_mapped(path, f["mtime_ns"]), size=_mapped(path, f["size"]), skipped=skipped,
                  sha256=Strings(f["sha256"]), vectors=_mapped(path, f["vectors"]), has_raw="raw_vectors" in f)
    store.handle = f
    if not (len(ids) == len(store.size) == n == int(attrs.get("count", n))):
        raise CbirError(f"{path} is inconsistent: its columns have different lengths")
    return store


def read_legacy_facts(path: Path) -> dict[str, Any]:
    """The index's own facts from a vectors.h5 made before segments (its attributes, next free id, skipped files)."""
    from cbir.search.expansion import Expansion
    from cbir.words import Words

    a = read_attrs(path)
    if not a.get("complete", False):
        raise CbirError(f"{path} is incomplete (its indexing run did not finish); re-run cbir index")
    try:
        with h5py.File(path, "r") as f:
            count = int(f["paths"].shape[0])
            next_id = count  # ids 0..N-1, or none
            if count and not a.get("ids_are_rows", False):
                next_id = int(np.max(f["ids"][()])) + 1
            skipped = list(zip(_strings(f["skipped/path"]), _strings(f["skipped/reason"]), strict=True))
    except OSError as exc:
        raise CbirError(f"cannot read {path}: {exc}") from exc
    return {"encoder": json.loads(a["encoder_config"]), "root": a["root"],
            "plan": SearchPlan.from_dict(json.loads(a["search"]) if "search" in a else None),
            "vector_dtype": a.get("vector_dtype", "float32"),
            "expansion": Expansion.from_dict(json.loads(a["expansion"]) if "expansion" in a else None),
            "words": Words.from_dict(json.loads(a["words"]) if "words" in a else None),
            "preset": a.get("preset") or None, "count": count, "next_id": next_id, "skipped": skipped,
            "created": a.get("created", ""), "cbir_version": a.get("cbir_version", ""),
            "seconds": float(a.get("seconds", 0.0))}


def replace_vectors(path: Path, searched: np.ndarray) -> None:
    """Keep the encoder's rows as `raw_vectors` and store `searched` (their DBA) as `vectors` (before the rename)."""
    with h5py.File(path, "a") as f:
        dtype = f["vectors"].dtype
        f.move("vectors", "raw_vectors")
        f.create_dataset("vectors", data=searched.astype(dtype))  # contiguous, like every segment's columns


@contextlib.contextmanager
def _opened(s: Store) -> Iterator[h5py.File]:
    """The store's open file (an on-disk segment keeps one), or the file opened for this one read."""
    if s.handle is not None and s.handle.id.valid:
        yield s.handle
        return
    with h5py.File(s.path, "r") as f:
        yield f


def read_rows(s: Store, column: str, rows: np.ndarray) -> np.ndarray:
    """Rows of a numeric column read from the file (not held in memory), in the order asked, float32."""
    rows = np.asarray(rows, np.int64)
    unique, inverse = np.unique(rows, return_inverse=True)
    with _opened(s) as f:
        got = f[column][unique] if len(unique) else np.zeros((0, s.dim), np.float32)
    return np.asarray(got, np.float32)[inverse]


def _capped(features: Packed) -> Packed:
    """At most KEEP keypoints a row (what a segment has room for; features are extracted with no more)."""
    counts = np.diff(features.offsets)
    if not len(counts) or counts.max() <= KEEP:
        return features
    return pack([None if f is None else f.strongest(KEEP) for f in (features.get(i) for i in range(len(features)))])


def keeps_features(s: Store) -> bool:
    """The file has a keypoint table (written by a run that kept local features)."""
    with _opened(s) as f:
        return "keypoints" in f


def read_features(s: Store, rows: np.ndarray) -> list[Features | None]:
    """The local features of rows, in the order asked (None for a row without, or a file that keeps none): two
    slices of the keypoint table per row, read from the file (a whole table is never held in memory)."""
    rows = np.asarray(rows, np.int64)
    with _opened(s) as f:
        if "keypoints" not in f or not len(rows):
            return [None] * len(rows)
        g = f["keypoints"]
        unique = np.unique(rows)
        starts, ends = g["offsets"][unique], g["offsets"][unique + 1]
        sizes = g["sizes"][unique]
        found: dict[int, Features | None] = {}
        for r, a, b, size in zip(unique.tolist(), starts, ends, sizes, strict=True):
            found[r] = Features(xy=g["xy"][a:b].astype(np.float32), descriptors=g["descriptors"][a:b],
                                size=(int(size[0]), int(size[1]))) if size.any() else None
    return [found[int(r)] for r in rows]


def read_ids(path: Path) -> np.ndarray | range:
    """A segment's id column alone (8 bytes a row): enough to find rows to delete."""
    attrs = read_attrs(path)
    try:
        with h5py.File(path, "r") as f:
            if attrs.get("ids_are_rows", False):
                return range(int(f["ids"].shape[0]))
            return f["ids"][()].astype(np.int64)
    except OSError as exc:
        raise CbirError(f"cannot read {path}: {exc}") from exc


def read_plan(path: Path) -> SearchPlan | None:
    """A segment's search plan, from its attributes only."""
    attrs = read_attrs(path)
    return SearchPlan.from_dict(json.loads(attrs["search"])) if "search" in attrs else None


def set_attrs(path: Path, attrs: dict[str, Any]) -> None:
    """Add attributes to a finished vectors file (used before it is renamed into place, never after)."""
    with h5py.File(path, "a") as f:
        for key, value in attrs.items():
            f.attrs[key] = value


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
