"""The Python API: build an index of a folder, open it, search it, add to it and remove from it.

    from cbir import Index
    Index.build("photos/", out="indexes/photos")
    for r in Index.open("indexes/photos").search("query.jpg", k=10):
        print(r.rank, r.score, r.path)

An `Index` answers every call from one generation of the index (cbir/search/segments.py); `add`, `remove` and
`compact` commit a new one and switch to it, and `refresh` picks up one another process committed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cbir.errors import BoxError, CbirError
from cbir.images import Box, crop, load_query
from cbir.layout import MANIFEST, VECTORS, resolve_index_dir
from cbir.metadata import show_date
from cbir.search import filters
from cbir.search.expansion import Expansion, expand_queries
from cbir.search.filters import Where, WhereLike, as_where
from cbir.search.manifest import Manifest
from cbir.search.searcher import use_gpu
from cbir.search.segments import Generation, RowFilter
from cbir.words import Words

if TYPE_CHECKING:
    from cbir.encoders import Encoder
    from cbir.encoders._onnx_query import OnnxQueryEncoder
    from cbir.local_features import Features
    from indexer.live import Added

log = logging.getLogger(__name__)
Query = str | os.PathLike[str] | bytes | Image.Image | np.ndarray


@dataclass(frozen=True, kw_only=True)
class Result:
    rank: int
    id: int
    path: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_TEXT = 1000  # characters of a text query; CLIP tokenizers keep the first 77 tokens anyway


def check_text(text: str) -> str:
    """A usable text query, or a plain error."""
    if not isinstance(text, str) or not text.strip():
        raise CbirError("the text query is empty: type what the pictures should show, e.g. 'a red bicycle'")
    if len(text) > MAX_TEXT:
        raise CbirError(f"the text query is {len(text)} characters long; at most {MAX_TEXT}")
    return text.strip()


def joint(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """A picture and a text as one query: the sum of the two unit vectors, normalised (the usual zero-shot way to
    compose them in a CLIP space: each contributes its direction equally)."""
    both = np.asarray(image, np.float32) + np.asarray(text, np.float32)
    return both / max(float(np.linalg.norm(both)), 1e-12)


class Columns:
    """Every live row's columns, in id order (one segment with nothing deleted: its own columns, not copied; an
    on-disk index's stay memory-mapped). A snapshot of one generation."""

    def __init__(self, gen: Generation) -> None:
        self._gen = gen
        segs = gen.segments
        self._whole = segs[0] if len(segs) == 1 and segs[0].live is None else None
        if self._whole is None:
            ids = [np.asarray(s.store.ids)[s.live_rows()] for s in segs]
            flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            self._order = np.argsort(flat, kind="stable")
            self._parts = [(s, s.live_rows()) for s in segs]

    def _column(self, name: str) -> Any:
        if self._whole is not None:
            return getattr(self._whole.store, name)
        parts = [np.asarray(getattr(s.store, name))[rows] if getattr(s.store, name) is not None else None
                 for s, rows in self._parts]
        if any(p is None for p in parts):
            return None
        return np.concatenate(parts)[self._order] if parts else np.zeros(0)

    @cached_property
    def ids(self) -> np.ndarray | range:
        return self._column("ids")

    @cached_property
    def paths(self) -> list[str]:
        got = self._column("paths")
        return got if self._whole is not None else [str(p) for p in got]

    @cached_property
    def vectors(self) -> np.ndarray:
        return self._column("vectors")

    @cached_property
    def size(self) -> np.ndarray:
        return self._column("size")

    @cached_property
    def mtime_ns(self) -> np.ndarray:
        return self._column("mtime_ns")

    @cached_property
    def sha256(self) -> list[str] | None:
        got = self._column("sha256")
        return got if got is None or self._whole is not None else [str(h) for h in got]

    def raw_vectors(self) -> np.ndarray:
        """The encoder's own vectors (alpha-DBA changes the searched ones), read from the files."""
        from cbir.search.writer import raw_vectors_of

        return raw_vectors_of(self._gen, np.asarray(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


class Index:
    """An opened index: its current generation of segments and (on first image query) its encoder."""

    def __init__(self, directory: Path, generation: Generation, device: str = "auto",
                 weights: str | None = None) -> None:
        self.directory = directory
        self._gen = generation
        self.device = device
        self._weights = weights
        self._encoder: Encoder | None = None
        self._onnx: OnnxQueryEncoder | None | bool = False  # False: not looked for yet
        self._lock = threading.Lock()
        self._signature = _signature(directory)
        self._columns: tuple[Generation, Columns] | None = None
        self._facets: tuple[Generation, dict[str, Any]] | None = None

    # -- building and opening -------------------------------------------------------------------------
    @classmethod
    def build(cls, root: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
              device: str = "auto", **options: Any) -> Index:
        """Embed every image under `root` and write the index to `out` (default ./indexes/<folder name>).

        `options` are those of `indexer.BuildOptions` (encoder, weights, pooling, precision, batch_size, workers,
        progress, exclude, rebuild / update, verify, index_type, float16, ...); with update=True the index keeps
        the encoder it was built with.
        """
        from indexer import BuildOptions, build
        from indexer.options import mode_of

        mode = mode_of(update=options.pop("update", False), rebuild=options.pop("rebuild", False))
        summary = build(root, out, BuildOptions(device=device, mode=mode, **options))
        return cls.open(summary.out, device=device, encoder=summary.encoder)

    @classmethod
    def open(cls, path: str | os.PathLike[str], device: str = "auto", weights: str | None = None,
             encoder: Encoder | None = None) -> Index:
        """Open an index folder. `weights` says where a weights file now is if the index was moved; `encoder`
        is a ready encoder to use for queries (one that built the index, or one shared between indexes)."""
        directory = resolve_index_dir(path)
        index = cls(directory, Generation.open(directory, gpu=use_gpu(device)), device=device, weights=weights)
        if encoder is not None:
            index.use_encoder(encoder)
        return index

    def refresh(self) -> bool:
        """Switch to the generation another writer committed since, opening only its new segments; True if one
        was found. Requests running on the old generation finish on it."""
        signature = _signature(self.directory)
        if signature == self._signature:
            return False
        key = self.encoder_key
        self._gen = Generation.open(self.directory, gpu=use_gpu(self.device), previous=self._gen)
        self._signature = signature
        if self.encoder_key != key:  # rebuilt with another encoder: queries must be embedded by the new one
            with self._lock:
                self._encoder, self._onnx = None, False
        return True

    # -- properties -----------------------------------------------------------------------------------
    @property
    def generation(self) -> Generation:
        """The generation this index answers from now (take it once per request: it never changes)."""
        return self._gen

    @property
    def manifest(self) -> Manifest:
        return self._gen.manifest

    def __len__(self) -> int:
        return len(self._gen)

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def encoder_config(self) -> dict[str, Any]:
        return self.manifest.settings.encoder

    @property
    def encoder_key(self) -> str:
        """Equal for indexes that embed queries with the same encoder (they may share one)."""
        import json

        return json.dumps(self.encoder_config, sort_keys=True)

    @property
    def root(self) -> Path:
        return Path(self.manifest.settings.root)

    @property
    def expansion(self) -> Expansion:
        return self.manifest.settings.expansion

    @property
    def words(self) -> Words:
        return self.manifest.settings.words

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Files the last full scan of the collection left out, with the reason."""
        return [tuple(s) for s in self.manifest.skipped]  # type: ignore[misc]

    def rows(self) -> Columns:
        """Every live row's columns (ids, paths, vectors, size, mtime_ns, sha256) of the current generation."""
        gen = self._gen
        if self._columns is None or self._columns[0] is not gen:
            self._columns = (gen, Columns(gen))
        return self._columns[1]

    def ids(self) -> np.ndarray | range:
        """Every live id, ascending."""
        return self._gen.ids()

    @property
    def encoder(self) -> Encoder:
        """The encoder this index was built with, rebuilt exactly from its record (loaded once)."""
        with self._lock:
            if self._encoder is None:
                from cbir.encoders import from_config

                self._encoder = from_config(self.encoder_config, device=self.device, weights=self._weights)
            return self._encoder

    @property
    def query_encoder(self) -> Encoder | OnnxQueryEncoder:
        """What embeds image queries: the encoder if it is built already, else the verified ONNX model of an fp32
        index (no torch to load: see cbir/encoders/_onnx_query.py), else the encoder."""
        if self._encoder is None and self._onnx is False:
            from cbir.encoders._onnx_query import load

            self._onnx = load(self.encoder_config)
        return self._encoder or self._onnx or self.encoder

    def prepare_fast_queries(self) -> bool:
        """Export and verify the ONNX query model of an fp32 index, so later processes need no torch to search."""
        from cbir.encoders._onnx_query import load, prepare

        if self._onnx or load(self.encoder_config) is not None:
            return True
        ok = prepare(self.encoder)
        log.info("prepared the ONNX query model of this encoder: later searches start without torch" if ok else
                 "the ONNX query model does not match this encoder closely enough; searches keep using torch")
        return ok

    def use_encoder(self, encoder: Encoder) -> None:
        """Embed queries with `encoder` (already built elsewhere); it must be the one the index records."""
        import json

        mine, theirs = self.encoder_config, json.loads(json.dumps(encoder.config))  # as the file holds it
        same = all(mine.get(key) == theirs.get(key) for key in ("name", "dim", "pooling", "preprocess", "precision")) \
            and mine["weights"].get("sha256") == theirs["weights"].get("sha256")
        if not same:
            raise CbirError(f"encoder {encoder!r} is not the one index {self.name} was built with")
        with self._lock:
            self._encoder = encoder

    # -- lookups by id --------------------------------------------------------------------------------
    def path_of(self, id_: int) -> str:
        return self.paths_of([id_])[0]

    def paths_of(self, ids: list[int]) -> list[str]:
        """The paths of several ids at once (one read of an on-disk index's path column)."""
        try:
            return self._gen.paths_of(ids)
        except KeyError as exc:
            raise CbirError(f"no image with id {exc.args[0]} in index {self.name}") from None

    def id_of(self, path: str) -> int | None:
        """The id of the image at `path` (relative to the root), or None (the first call reads a segment's paths)."""
        return self._gen.id_of(path)

    def vector_of(self, id_: int) -> np.ndarray:
        try:
            return self._gen.vectors_of([int(id_)])[0]
        except KeyError:
            raise CbirError(f"no image with id {id_} in index {self.name}") from None

    def file_of(self, id_: int) -> Path:
        return self.root / self.path_of(id_)

    def features_of(self, ids: list[int]) -> list[Features | None]:
        """The local features the index keeps for `ids` (None for a row kept without: verify from its file)."""
        try:
            return self._gen.features_of(ids)
        except KeyError as exc:
            raise CbirError(f"no image with id {exc.args[0]} in index {self.name}") from None

    # -- searching ------------------------------------------------------------------------------------
    def embed(self, query: Query, box: Box | None = None) -> np.ndarray:
        """A query (path, bytes, PIL image or ready vector) as one L2-normalised vector; `box` (x0, y0, x1, y1 in
        the picture's pixels) embeds only that region."""
        if isinstance(query, np.ndarray):
            v = np.asarray(query, np.float32).reshape(-1)
            if v.shape[0] != self._gen.dim:
                raise CbirError(f"query vector has dimension {v.shape[0]}, index {self.name} has {self._gen.dim}")
            return v / max(float(np.linalg.norm(v)), 1e-12)
        return self.query_encoder.embed([self.query_picture(query, box)])[0]

    def query_picture(self, query: Query, box: Box | None = None) -> Image.Image:
        """The decoded RGB picture (or its region `box`) that a query embeds: the server decodes it in the request's
        own thread, then embeds many at once."""
        if isinstance(query, Image.Image):
            im = query.convert("RGB")
        else:
            im = load_query(query, draft=None if box else self.query_encoder.preprocess.draft_size)
        if box is not None:
            try:
                im = crop(im, box)
            except ValueError as exc:
                raise BoxError(str(exc)) from None
        return im

    # -- text queries (an index of a CLIP model) --------------------------------------------------------
    @property
    def has_text(self) -> bool:
        """Whether its encoder embeds text into the image vectors' space (read from the record: nothing is built)."""
        return bool(self.encoder_config.get("text"))

    def embed_text(self, text: str) -> np.ndarray:
        """A text query ("a red bicycle") as one L2-normalised vector in the images' space."""
        text = check_text(text)
        if not self.has_text:
            raise CbirError(f"index {self.name} was built with {self.encoder_config['name']}, which has no text "
                            "tower: text search needs an index of a CLIP model, e.g. cbir index DIR --encoder "
                            "clip:ViT-B-32 --weights laion2b_s34b_b79k")
        return self.encoder.embed_text([text])[0]

    def search_text(self, text: str, k: int = 10, image: Query | None = None, exclude_ids: tuple[int, ...] = (), *,
                    where: WhereLike = None) -> list[Result]:
        """The k images best matching `text`; with `image` (any query), those like the picture and the text together
        ("a picture plus 'at night'": see `joint`)."""
        vector = self.embed_text(text)
        if image is not None:
            vector = joint(self.embed(image), vector)
        return self.search_vector(vector, k, exclude_ids, where=where)

    def search(self, query: Query, k: int = 10, exclude_ids: tuple[int, ...] = (),
               row_filter: RowFilter | None = None, *, where: WhereLike = None) -> list[Result]:
        """The k most similar indexed images, best first; `where` keeps to the images it allows (a `Where`, or its
        words: {"folder": "Holidays", "after": "2023-01-01", "before": "2024-01-01", "camera": "Pixel 7",
        "tags": ["product"]}), the true top-k among them."""
        return self.search_vector(self.embed(query), k, exclude_ids, row_filter=row_filter, where=where)

    def search_id(self, id_: int, k: int = 10, include_self: bool = False, box: Box | None = None,
                  row_filter: RowFilter | None = None, *, where: WhereLike = None) -> list[Result]:
        """"More like this" for an indexed image (its stored vector; with `box`, that region of its file)."""
        vector = self.vector_of(id_) if box is None else self.embed(self.file_of(id_), box=box)
        return self.search_vector(vector, k, () if include_self else (int(id_),), row_filter=row_filter,
                                  where=where)

    def search_vector(self, vector: np.ndarray, k: int = 10, exclude_ids: tuple[int, ...] = (), *,
                      row_filter: RowFilter | None = None, where: WhereLike = None) -> list[Result]:
        """The k nearest to `vector` (after the index's query expansion, if it has one), best first; `row_filter`
        and `where` narrow the rows that may be answered (the true top-k among them)."""
        if not isinstance(k, int) or k < 1:
            raise CbirError(f"k must be a positive whole number, not {k!r}")
        gen = self._gen
        row_filter = self._narrowed(row_filter, as_where(where), gen)
        query = self.expand(vector[None, :], [exclude_ids], generation=gen)
        scores, ids = gen.search(query, k + len(exclude_ids), row_filter)
        kept = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True)
                if i >= 0 and int(i) not in exclude_ids][:k]
        paths = gen.paths_of([i for _, i in kept])
        return [Result(rank=n + 1, id=i, path=p, score=s)
                for n, ((s, i), p) in enumerate(zip(kept, paths, strict=True))]

    @staticmethod
    def _narrowed(row_filter: RowFilter | None, where: Where | None, gen: Generation) -> RowFilter | None:
        """`row_filter` and `where` together (a folder, camera or tag the index does not have is an error)."""
        if not where:
            return row_filter
        filters.check_known(where, [s.columns() for s in gen.segments])
        by_where = filters.row_filter(where)
        if row_filter is None:
            return by_where

        def both(segment):
            other = row_filter(segment)
            return by_where(segment) if other is None else by_where(segment) & other

        return both

    def matching(self, where: WhereLike) -> np.ndarray:
        """The ids of every live image `where` allows, ascending (the collection grid of a filtered page)."""
        where = as_where(where)
        gen = self._gen
        if not where:
            return np.asarray(gen.ids())
        filters.check_known(where, [s.columns() for s in gen.segments])
        parts = []
        for s in gen.segments:
            allowed = s.allowed(filters.row_filter(where))
            rows = allowed.rows() if allowed is not None else np.arange(len(s.store))
            parts.append(s.store.ids_at(rows))
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def facets(self) -> dict[str, Any]:
        """What the live images' metadata holds: folders, cameras and tags (with counts), the dates taken (worked
        out once per generation: the page shows them with every request)."""
        gen = self._gen
        if self._facets is None or self._facets[0] is not gen:
            self._facets = (gen, self._facets_of(gen))
        return self._facets[1]

    @staticmethod
    def _facets_of(gen: Generation) -> dict[str, Any]:
        folders: set[str] = set()
        cameras: Counter[str] = Counter()
        tags: Counter[str] = Counter()
        first, last, exif, files = None, None, 0, 0
        for s in gen.segments:
            live, columns = (s.live.mask if s.live is not None else None), s.columns()
            folders.update(columns.folders(live))
            cameras.update(columns.cameras(live))
            tags.update(columns.tags(live))
            d = columns.dates(live)
            if d:
                first = d["first"] if first is None else min(first, d["first"])
                last = d["last"] if last is None else max(last, d["last"])
                exif, files = exif + d["from_camera"], files + d["from_file"]
        dates = {"first": show_date(first), "last": show_date(last), "from_camera": exif, "from_file": files} \
            if first is not None and last is not None else {}
        return {"folders": sorted(folders), "cameras": dict(cameras.most_common()),
                "tags": dict(sorted(tags.items(), key=lambda t: (-t[1], t[0]))), "dates": dates}

    def expand(self, queries: np.ndarray, exclude: list[tuple[int, ...]] | None = None, *,
               generation: Generation | None = None) -> np.ndarray:
        """alpha-QE of query rows [B, D] with their top neighbours (ids in `exclude[i]` left out), as the index
        records it; the rows themselves when it records none."""
        qe = self.expansion
        if not qe.qe_k:
            return np.ascontiguousarray(queries, dtype=np.float32)
        gen = generation or self._gen
        return expand_queries(queries, gen.search, gen.vectors_of, qe.qe_k, qe.qe_alpha, exclude)

    # -- changing it ----------------------------------------------------------------------------------
    def add(self, items: list[str | os.PathLike[str] | bytes | Image.Image]) -> list[Added]:
        """Embed and commit images: paths of files under the root as they are; anything else (bytes, pictures,
        files elsewhere) is stored in the index's uploads folder first. Searchable when this returns."""
        from indexer.live import add

        return add(self, items)

    def remove(self, ids: list[int]) -> int:
        """Remove images from the index (their files stay; `--update` and the watcher leave them out until the
        file changes). Returns how many were removed."""
        from indexer.live import remove

        return remove(self, ids)

    def compact(self) -> None:
        """Merge every segment into one (deleted rows dropped, the search index built and tuned again)."""
        from indexer.live import compact

        compact(self)

    def switch_to(self, manifest: Manifest) -> None:
        """After a write by this process: answer from its new generation (only the new files are opened)."""
        self._gen = Generation.open(self.directory, gpu=use_gpu(self.device), previous=self._gen, manifest=manifest)
        self._signature = _signature(self.directory)

    # -- describing it --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The few facts a list of indexes shows (the page, /api/indexes)."""
        cfg = self.encoder_config
        return {"images": len(self), "encoder": cfg["name"], "dim": cfg["dim"], "pooling": cfg["pooling"],
                "created": self.manifest.created, "generation": self.manifest.generation, "text": self.has_text}

    def info(self) -> dict[str, Any]:
        """Everything `cbir info` shows."""
        m, gen = self.manifest, self._gen
        plans = [s.search.plan for s in gen.segments]
        return {
            "index": str(self.directory),
            "images": len(self),
            "skipped": len(m.skipped),
            "dim": gen.dim,
            "root": m.settings.root,
            "encoder": self.encoder_config,
            "created": m.created,
            "updated": m.updated,
            "cbir_version": m.cbir_version,
            "generation": m.generation,
            "segments": [{"name": s.name, "rows": s.entry.rows, "deleted": s.entry.deleted,
                          "search": {**s.search.plan.to_dict(), "gpu": s.search.gpu, "ntotal": s.search.ntotal}}
                         for s in gen.segments],
            "deleted": m.deleted,
            "search": {**(plans[0].to_dict() if plans else {}), "gpu": any(s.search.gpu for s in gen.segments),
                       "ntotal": sum(s.search.ntotal for s in gen.segments)},
            "vector_dtype": m.settings.vector_dtype,
            "expansion": self.expansion.to_dict(),
            "words": self.words.to_dict(),
            "preset": m.settings.preset,
            "seconds": m.seconds,
            "removed_files": sorted(m.removed),
            "left_out": [{"reason": reason, "extension": ext, "files": n} for reason, ext, n in m.left_out],
            "metadata": self.facets(),
        }


def _signature(directory: Path) -> tuple[int, int, int]:
    """What changes when a writer commits (the manifest, or the vectors file of an index made before segments)."""
    path = directory / MANIFEST if (directory / MANIFEST).is_file() else directory / VECTORS
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return st.st_ino, st.st_mtime_ns, st.st_size
