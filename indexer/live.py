"""Changing an open index in place: add images, remove them, compact (Index.add/remove/compact, the web API's writes,
the watched folder). Each call is one write through the segment writer (cbir/search/writer.py), under the index's
lock, committed as a new generation that the `Index` switches to before returning: an added image is searchable when
the call returns, a removed one is never answered again.

Files that come in as bytes or pictures, or from outside the collection, are stored under the collection's root in
`cbir-uploads/`, named by their content hash (never overwriting); removing one of those deletes the file too. A
file of the person's own folder stays on disk and is remembered as removed (the manifest's `removed`), so that
`--update` and the watcher leave it out until the file itself changes.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from cbir import metadata
from cbir.errors import CbirError
from cbir.files import atomic_path, sha256_bytes
from cbir.images import ImageError, load_image
from cbir.local_features import Features, pack
from cbir.search import policy
from cbir.search.writer import IndexWriter, RowBlock, merge_segments
from indexer.decode import decode
from indexer.lock import IndexLock
from indexer.source import Source

if TYPE_CHECKING:
    from cbir.encoders import Encoder
    from cbir.search.manifest import Manifest
    from cbir.search.segments import Generation

log = logging.getLogger(__name__)
FOLDER_NAME = re.compile(r"\w[\w .-]{0,63}")  # one name: no separators, no "..", not hidden
UPLOADS = "cbir-uploads"  # under the collection's root: discovered by --update like any folder (not hidden)
LOCK_WAIT_S = 30.0  # a write waits this long for another writer (a running --update) before it gives up
_THREADS: dict[str, threading.Lock] = {}  # one writer per folder within this process too (the file lock is per process)
_THREADS_LOCK = threading.Lock()


class Index(Protocol):
    """What a write needs of an open index (cbir.index.Index is one): it is changed in place, then switched to the
    new generation."""

    directory: Path

    @property
    def root(self) -> Path: ...

    @property
    def manifest(self) -> Manifest: ...

    @property
    def generation(self) -> Generation: ...

    @property
    def encoder(self) -> Encoder: ...

    def id_of(self, path: str) -> int | None: ...

    def refresh(self) -> bool: ...

    def switch_to(self, manifest: Manifest) -> None: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True, kw_only=True)
class Added:
    id: int
    path: str  # relative to the root
    new: bool  # False: the file was indexed already, unchanged (its id is given back)


def _writer_lock(index: Index) -> threading.Lock:
    with _THREADS_LOCK:
        return _THREADS.setdefault(str(index.directory.resolve()), threading.Lock())


def add(index: Index, items: Sequence[str | os.PathLike[str] | bytes | Image.Image], *, folder: str = "",
        skip_bad: bool = False, reuse: dict[str, int] | None = None) -> list[Added]:
    """Embed `items` and commit them as one segment (see the module docstring for where files go; `folder`: a
    sub-folder of the uploads folder for items stored there). A file that does not decode is an error, or with
    `skip_bad` left out (logged). `reuse`: path -> id of an indexed row with the same bytes (a moved file): its
    vector is taken, nothing embedded."""
    root = index.root
    if not root.is_dir():
        raise CbirError(f"the collection's folder {root} is not here: images can be added only beside it")
    rels = [_place(root, item, folder) for item in items]
    with _writer_lock(index), IndexLock(index.directory, wait=LOCK_WAIT_S):
        index.refresh()
        known = _known(index, rels)
        todo = sorted({r for r in rels if r not in known})
        if todo:
            manifest, todo = _commit_new(index, todo, skip_bad=skip_bad, reuse=reuse or {})
            index.switch_to(policy.merge_small(index.directory, manifest))
    ids = {**known, **_known(index, todo)}
    return [Added(id=ids[r], path=r, new=r in todo) for r in rels if r in ids]


def _known(index: Index, rels: list[str]) -> dict[str, int]:
    """The files already indexed and unchanged since: path -> id."""
    out = {}
    for rel in set(rels):
        id_ = index.id_of(rel)
        if id_ is None:
            continue
        st = (index.root / rel).stat()
        recorded = (index.generation.column("size", [id_])[0], index.generation.column("mtime_ns", [id_])[0])
        if recorded == (st.st_size, st.st_mtime_ns):
            out[rel] = id_
    return out


def _commit_new(index: Index, todo: list[str], *, skip_bad: bool,
                reuse: dict[str, int]) -> tuple[Manifest, list[str]]:
    """Embed the files (or take a moved file's vector) and write them as one segment; a changed file's old row is
    deleted and its id carried on. Returns the new generation and the files written."""
    embedded, vectors, rows, kept = _embed(index, [r for r in todo if r not in reuse], skip_bad)
    moved = [r for r in todo if r in reuse]
    gen = index.generation
    if moved:
        from cbir.search.writer import raw_vectors_of

        vectors = np.concatenate([vectors, raw_vectors_of(gen, np.array([reuse[r] for r in moved]))])
        moved_meta = gen.meta_of([reuse[r] for r in moved])
        rows += [(*_stat(index.root / r), gen.column("sha256", [reuse[r]])[0],
                  metadata.from_columns(moved_meta, n)) for n, r in enumerate(moved)]
        kept += gen.features_of([reuse[r] for r in moved])
    paths = embedded + moved
    writer = IndexWriter(index.directory, index.manifest)
    before = {r: index.id_of(r) for r in paths}
    metas = _carried_tags(gen, paths, [row[3] for row in rows], before)
    writer.delete([i for i in before.values() if i is not None] + [reuse[r] for r in moved])
    fresh = iter(writer.new_ids(sum(i is None for i in before.values())))
    block = RowBlock(ids=np.array([before[r] if before[r] is not None else next(fresh) for r in paths], np.int64),
                     paths=paths, vectors=vectors, mtime_ns=np.array([r[1] for r in rows], np.int64),
                     size=np.array([r[0] for r in rows], np.int64), sha256=[r[2] for r in rows],
                     meta=metadata.to_columns(metas),
                     features=pack(kept) if any(f is not None for f in kept) else None)
    writer.add_segment(len(paths), [block])
    removed = {p: v for p, v in index.manifest.removed.items() if p not in paths}
    return writer.commit(removed=removed), paths


def _carried_tags(gen, paths: list[str], metas: list[metadata.Meta],
                  before: dict[str, int | None]) -> list[metadata.Meta]:
    """The metadata of new rows with the tags a person gave the picture before (a changed file's previous row; a
    moved file's row is its previous one)."""
    known = [i for i in before.values() if i is not None]
    previous = gen.meta_of(known) if known else {}
    at = {i: n for n, i in enumerate(known)}
    return [metadata.with_tags(m, None, metadata.from_columns(previous, at[before[r]]) if before[r] is not None
                               else m) for r, m in zip(paths, metas, strict=True)]


def _embed(index: Index, files: list[str],
           skip_bad: bool) -> tuple[list[str], np.ndarray, list[tuple], list[Features | None]]:
    """Decode and embed files under the root: (the files embedded, their vectors, (size, mtime_ns, sha256, metadata)
    each, their local features if the index keeps them)."""
    enc = index.encoder
    source = Source.of(index.root)
    keep = index.manifest.settings.local_features
    decoded = [decode(source, rel, enc.preprocess, keep) for rel in files]
    for bad in (d for d in decoded if not d.ok):
        if not skip_bad:
            raise CbirError(f"cannot index {bad.file}: {bad.reason}")
        log.warning(f"left out {bad.file}: {bad.reason}")
    good = [d for d in decoded if d.ok]
    vectors = enc.embed_pixels(np.stack([d.pixels for d in good])) if good else np.zeros((0, enc.dim), np.float32)
    return [d.file for d in good], vectors, [(d.size, d.mtime_ns, d.sha256, d.meta or metadata.Meta(
        taken_ns=metadata.file_time_ns(d.mtime_ns))) for d in good], [d.features for d in good]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _place(root: Path, item: str | os.PathLike[str] | bytes | Image.Image, folder: str = "") -> str:
    """The path under `root` of an item to add: a file under the root as it is; anything else stored in the
    uploads folder by content hash (an image that does not decode is refused before anything is written)."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item).resolve()
        if not path.is_file():
            raise CbirError(f"no such file: {item}")
        if path.is_relative_to(root.resolve()):
            return path.relative_to(root.resolve()).as_posix()
        data = path.read_bytes()
    elif isinstance(item, Image.Image):
        buf = io.BytesIO()
        item.save(buf, "PNG")
        data = buf.getvalue()
    else:
        data = bytes(item)
    return store_upload(root, data, folder)


def store_upload(root: Path, data: bytes, folder: str = "") -> str:
    """Write an image's bytes to `root/cbir-uploads/[folder/]<sha256[:20]>.<ext>` (kept if there already: same
    bytes); returns its path relative to the root. Not an image, or a folder name that is not one plain name: a plain
    error, nothing written."""
    if folder and not FOLDER_NAME.fullmatch(folder):
        raise CbirError(f"folder must be one plain name (letters, digits, spaces, - _ .), not {folder[:40]!r}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = (im.format or "img").lower().replace("jpeg", "jpg")
        load_image(data)
    except (ImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CbirError(f"not a usable image: {exc}") from None
    rel = f"{UPLOADS}/{folder + '/' if folder else ''}{sha256_bytes(data)[:20]}.{ext}"
    target = root / rel
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return rel


def remove(index: Index, ids: Sequence[int]) -> int:
    """Remove rows; files that came in through uploads are deleted, the person's own are remembered as removed."""
    with _writer_lock(index), IndexLock(index.directory, wait=LOCK_WAIT_S):
        index.refresh()
        gen = index.generation
        where = gen.locate(np.asarray(list(ids), np.int64))
        live = [int(i) for i, f in zip(ids, where.found, strict=True) if f]
        if not live:
            return 0
        paths = gen.paths_of(live)
        stats = dict(zip(paths, zip(gen.column("size", live), gen.column("mtime_ns", live), strict=True),
                         strict=True))
        writer = IndexWriter(index.directory, index.manifest)
        writer.delete(live)
        ours = [p for p in paths if p.startswith(f"{UPLOADS}/")]
        removed = {**index.manifest.removed, **{p: tuple(map(int, v)) for p, v in stats.items() if p not in ours}}
        manifest = writer.commit(removed=removed)
        for p in ours:
            (index.root / p).unlink(missing_ok=True)
        index.switch_to(policy.merge_small(index.directory, manifest))
    return len(live)


def restore(index: Index, block: RowBlock) -> int:
    """Put rows back as they were: their ids, vectors and metadata (the undo of `cbir duplicates --move-to`, whose
    files are back in place). Rows whose ids are live already are left as they are; returns how many came back."""
    with _writer_lock(index), IndexLock(index.directory, wait=LOCK_WAIT_S):
        index.refresh()
        back = ~index.generation.locate(block.ids).found
        if not back.any():
            return 0
        part = block.take(np.flatnonzero(back))
        writer = IndexWriter(index.directory, index.manifest)
        writer.add_segment(len(part), [part])
        removed = {p: v for p, v in index.manifest.removed.items() if p not in set(part.paths)}
        index.switch_to(policy.merge_small(index.directory, writer.commit(removed=removed)))
    return len(part)


def remove_paths(index: Index, paths: Sequence[str]) -> int:
    """Remove the rows of files that are gone from the folder (the watcher); unknown paths are ignored."""
    ids = [i for i in (index.id_of(p) for p in paths) if i is not None]
    if not ids:
        return 0
    with _writer_lock(index), IndexLock(index.directory, wait=LOCK_WAIT_S):
        index.refresh()
        writer = IndexWriter(index.directory, index.manifest)
        count = writer.delete(ids)
        removed = {p: v for p, v in index.manifest.removed.items() if p not in set(paths)}
        index.switch_to(policy.merge_small(index.directory, writer.commit(removed=removed)))
    return count


def compact(index: Index) -> None:
    """Every segment merged into one: deleted rows dropped, alpha-DBA and the search index made anew."""
    with _writer_lock(index), IndexLock(index.directory, wait=LOCK_WAIT_S):
        index.refresh()
        manifest = merge_segments(index.directory, index.manifest, [s.name for s in index.manifest.segments],
                                  again=True)
        index.switch_to(manifest)

