"""The vectors file (`vectors.h5`): embeddings and the metadata that belongs to each row, in one HDF5 file.

Layout (format 1):
    vectors   float32 [N, D]   L2-normalised rows, as searched (optionally float16 on disk)
    raw_vectors float32 [N, D] the encoder's own rows, when `vectors` hold their alpha-DBA (see expansion.py)
    paths     utf-8    [N]     relative to the attribute `root`
    ids       int64    [N]     stable ids; FAISS returns these
    mtime_ns  int64    [N]
    size      int64    [N]
    sha256    utf-8    [N]     content hash (byte-identical duplicates, --update --verify)
    skipped/path, skipped/reason   utf-8 [M]
    attrs: format, encoder, encoder_config (JSON), dim, count, root, cbir_version, created, complete,
           vector_dtype (float32|float16), search (JSON: the search plan and its measured recall),
           expansion (JSON: alpha-QE and alpha-DBA settings; absent: none)

Rows are appended batch by batch as they are embedded, so memory does not grow with the collection;
`complete` is set only when the writer closes normally, and readers refuse a file without it.

When the row count is known before writing (the commit stage knows it), the numeric columns are stored
contiguously (attr `contiguous`), and `open_lazy` memory-maps them: an index of 10 million images opens without
reading its vectors, ids or paths (rows are read when asked for; see cbir/search/ondisk.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cbir.errors import CbirError
from cbir.files import writing

FORMAT = 1
STR = h5py.string_dtype("utf-8")
ROW_BYTES = 200  # a row's metadata: id, mtime, size, sha256 (hex), a path of ~100 bytes


def bytes_needed(rows: int, dim: int, itemsize: int = 4) -> int:
    """About how large a vectors file of `rows` rows is (what a write needs free)."""
    return rows * (dim * itemsize + ROW_BYTES) + 64 * 1024


def _translated(method: Callable[..., Any]) -> Callable[..., Any]:
    """A writer's method whose failed writes (disk full, quota, read-only, permission) are a WriteError."""
    @functools.wraps(method)
    def wrapper(self: VectorWriter, *args: Any, **kwargs: Any) -> Any:
        with writing(self.path, needed=self.bytes_needed):
            return method(self, *args, **kwargs)

    return wrapper


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
        return bytes_needed(self.rows, self.dim, self.itemsize) if self.rows is not None else None

    @_translated
    def _create(self, attrs: dict[str, Any], chunk_rows: int, dtype: str) -> None:
        dim, rows = self.dim, self.rows
        self.f = h5py.File(self.path, "w")
        numeric = (("vectors", dtype, (dim,)), ("ids", "int64", ()), ("mtime_ns", "int64", ()), ("size", "int64", ()))
        for name, dt, tail in numeric:
            if rows is None:
                self.f.create_dataset(name, (0, *tail), dtype=dt, maxshape=(None, *tail), chunks=(chunk_rows, *tail))
            else:
                self.f.create_dataset(name, (rows, *tail), dtype=dt)
        for name in ("paths", "sha256"):
            self.f.create_dataset(name, (0,), dtype=STR, maxshape=(None,), chunks=(chunk_rows,))
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
               ids: Sequence[int] | None = None, sha256: Sequence[str] | None = None) -> None:
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
        for name, data in columns.items():
            ds = self.f[name]
            if ds.maxshape[0] is None:
                ds.resize(stop, axis=0)
            ds[start:stop] = data
        self.count = stop

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

    def abort(self) -> None:
        """Let go of the file whatever state a failed write left it in (it is deleted next: no second error)."""
        with contextlib.suppress(OSError, RuntimeError, ValueError, AttributeError):
            if self.f.id.valid:
                self.f.close()


@dataclass
class Store:
    """Everything in a vectors file, read into memory (the vectors themselves only when asked)."""

    path: Path
    attrs: dict[str, Any]
    paths: list[str]
    ids: np.ndarray
    mtime_ns: np.ndarray
    size: np.ndarray
    skipped: list[tuple[str, str]]
    sha256: list[str] | None = None  # content hash per file (absent in files from before it was recorded)
    vectors: np.ndarray | None = field(default=None, repr=False)
    raw_vectors: np.ndarray | None = field(default=None, repr=False)  # with DBA: the encoder's rows, if asked
    handle: h5py.File | None = field(default=None, repr=False)  # open_lazy: the file its columns read from

    @property
    def lazy(self) -> bool:
        return self.handle is not None

    @property
    def encoder_config(self) -> dict[str, Any]:
        return json.loads(self.attrs["encoder_config"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def root(self) -> Path:
        return Path(self.attrs["root"])

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
                  sha256=Strings(f["sha256"]), vectors=_mapped(path, f["vectors"]))
    store.handle = f
    if not (len(ids) == len(store.size) == n == int(attrs.get("count", n))):
        raise CbirError(f"{path} is inconsistent: its columns have different lengths")
    return store


def replace_vectors(path: Path, searched: np.ndarray) -> None:
    """Keep the encoder's rows as `raw_vectors` and store `searched` (their DBA) as `vectors` (before the rename)."""
    with h5py.File(path, "a") as f:
        old = f["vectors"]
        dtype, chunks = old.dtype, old.chunks
        f.move("vectors", "raw_vectors")
        f.create_dataset("vectors", data=searched.astype(dtype), maxshape=(None, searched.shape[1]), chunks=chunks)


def set_attrs(path: Path, attrs: dict[str, Any]) -> None:
    """Add attributes to a finished vectors file (used before it is renamed into place, never after)."""
    with h5py.File(path, "a") as f:
        for key, value in attrs.items():
            f.attrs[key] = value


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
