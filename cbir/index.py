"""The Python API: build an index of a folder, open it, search it.

    from cbir import Index
    Index.build("photos/", out="indexes/photos")
    for r in Index.open("indexes/photos").search("query.jpg", k=10):
        print(r.rank, r.score, r.path)
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cbir.errors import BoxError, CbirError, QueryImageError
from cbir.images import Box, ImageError, crop, load_image
from cbir.layout import FAISS, VECTORS, resolve_index_dir
from cbir.search import store as store_mod
from cbir.search import tuning
from cbir.search.expansion import Expansion, combine
from cbir.search.plan import ONDISK, SearchPlan
from cbir.search.searcher import VectorSearch, use_gpu
from cbir.words import Words

if TYPE_CHECKING:
    from cbir.encoders import Encoder
    from cbir.encoders._onnx_query import OnnxQueryEncoder

log = logging.getLogger(__name__)
Query = str | os.PathLike[str] | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class Result:
    rank: int
    id: int
    path: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _agrees(search: VectorSearch, store: store_mod.Store) -> bool:
    """The FAISS file belongs to these vectors: same count, dimension, ids, and (exact) a sample of rows."""
    if search.ntotal != len(store) or search.dim != store.dim or not np.array_equal(search.ids, store.ids):
        return False
    if not search.exact:
        return True
    assert store.vectors is not None
    atol = 1e-3 if store.vectors.dtype == np.float32 and store.attrs.get("vector_dtype", "float32") == "float32" \
        else 2e-3
    for row in np.linspace(0, len(store) - 1, num=min(8, len(store)), dtype=np.int64):
        if not np.allclose(search.reconstruct(int(row)), store.vectors[row], atol=atol):
            return False
    return True


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


class RowsById:
    """id -> row of the vectors file: arithmetic when ids are the row numbers (a `range`), else a sorted lookup."""

    def __init__(self, ids: np.ndarray | range) -> None:
        self.range = ids if isinstance(ids, range) else None
        if self.range is None:
            ids = np.asarray(ids, np.int64)
            self.order = np.argsort(ids, kind="stable")
            self.sorted = ids[self.order]

    def __getitem__(self, id_: int) -> int:
        rows = self.rows(np.array([id_], np.int64))
        if rows[0] < 0:
            raise KeyError(id_)
        return int(rows[0])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (-1 where unknown)."""
        ids = np.asarray(ids, np.int64)
        if self.range is not None:
            return np.where((ids >= 0) & (ids < len(self.range)), ids, -1)
        if not len(self.sorted):
            return np.full(len(ids), -1, np.int64)
        at = np.clip(np.searchsorted(self.sorted, ids), 0, len(self.sorted) - 1)
        return np.where(self.sorted[at] == ids, self.order[at], -1)


class Index:
    """An opened index: its vectors and metadata, its FAISS index, and (on first image query) its encoder."""

    def __init__(self, directory: Path, store: store_mod.Store, search: VectorSearch, device: str = "auto",
                 weights: str | None = None) -> None:
        self.directory = directory
        self.store = store
        self.searcher = search
        self.device = device
        self._weights = weights
        self._encoder: Encoder | None = None
        self._onnx: OnnxQueryEncoder | None | bool = False  # False: not looked for yet
        self._lock = threading.Lock()
        self._pos = RowsById(store.ids)
        self._by_path: dict[str, int] | None = None
        self.expansion = Expansion.from_dict(json.loads(store.attrs["expansion"])) if "expansion" in store.attrs \
            else Expansion()
        self.words = Words.from_dict(json.loads(store.attrs["words"])) if "words" in store.attrs else Words()

    # -- building and opening -------------------------------------------------------------------------
    @classmethod
    def build(cls, root: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
              device: str = "auto", **options: Any) -> Index:
        """Embed every image under `root` and write the index to `out` (default ./indexes/<folder name>).

        `options` are those of `indexer.BuildOptions` (encoder, weights, pooling, precision, batch_size, workers,
        progress, exclude, rebuild / update, verify, index_type, float16); with update=True the index keeps
        the encoder it was built with.
        """
        from indexer import BuildOptions, build

        update, rebuild = options.pop("update", False), options.pop("rebuild", False)
        if update and rebuild:
            raise CbirError("update and rebuild exclude each other")
        mode = "update" if update else "rebuild" if rebuild else "create"
        summary = build(root, out, BuildOptions(device=device, mode=mode, **options))
        return cls.open(summary.out, device=device, encoder=summary.encoder)

    @classmethod
    def open(cls, path: str | os.PathLike[str], device: str = "auto", weights: str | None = None,
             encoder: Encoder | None = None) -> Index:
        """Open an index folder. `weights` says where a weights file now is if the index was moved; `encoder`
        is a ready encoder to use for queries (one that built the index, or one shared between indexes)."""
        directory = resolve_index_dir(path)
        attrs = store_mod.read_attrs(directory / VECTORS)
        if "search" in attrs and json.loads(attrs["search"]).get("type") == ONDISK:
            index = cls._open_on_disk(directory, device, weights)
            if encoder is not None:
                index.use_encoder(encoder)
            return index
        store = store_mod.read(directory / VECTORS, vectors=True)
        assert store.vectors is not None
        gpu = use_gpu(device)
        faiss_path = directory / FAISS
        search: VectorSearch | None = None
        plan = SearchPlan.from_dict(json.loads(store.attrs["search"])) if "search" in store.attrs else None
        if faiss_path.is_file():
            search = VectorSearch.load(faiss_path, plan, gpu=gpu)
            if not _agrees(search, store):
                warnings.warn(f"{faiss_path} does not match {VECTORS}; searching the vectors exactly instead "
                              "(run cbir index --update to rebuild it)", stacklevel=2)
                search = None
        if search is None:  # exact search is always right, and needs no training
            search = VectorSearch(tuning.flat(store.vectors, store.ids), gpu=gpu)
        index = cls(directory, store, search, device=device, weights=weights)
        if encoder is not None:
            index.use_encoder(encoder)
        return index

    @classmethod
    def _open_on_disk(cls, directory: Path, device: str, weights: str | None) -> Index:
        """An index larger than memory: vectors and ids memory-mapped, paths read per row, FAISS lists on disk.
        Opening reads none of them; a query reads its candidates' rows to re-rank them."""
        from cbir.search import ondisk

        store = store_mod.open_lazy(directory / VECTORS)
        plan = SearchPlan.from_dict(json.loads(store.attrs["search"]))
        if not (directory / FAISS).is_file():
            raise CbirError(f"{directory / FAISS} is missing; rebuild the index with cbir index --rebuild")
        faiss_index = ondisk.load(directory / FAISS)
        if faiss_index.ntotal != len(store) or faiss_index.d != store.dim:
            raise CbirError(f"{directory / FAISS} does not match {VECTORS}; rebuild the index with "
                            "cbir index --rebuild")
        assert store.vectors is not None
        read_rows = ondisk.rows_reader(store.vectors)
        # the index's own id -> row lookup (built once, in __init__), bound when a query runs
        search = VectorSearch(faiss_index, plan, exact_rows=lambda ids: read_rows(index._pos.rows(ids)))
        index = cls(directory, store, search, device=device, weights=weights)
        return index

    # -- properties -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.store)

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def encoder_config(self) -> dict[str, Any]:
        return self.store.encoder_config

    @property
    def root(self) -> Path:
        return self.store.root

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
        mine, theirs = self.encoder_config, json.loads(json.dumps(encoder.config))  # as the file holds it
        same = all(mine.get(key) == theirs.get(key) for key in ("name", "dim", "pooling", "preprocess", "precision")) \
            and mine["weights"].get("sha256") == theirs["weights"].get("sha256")
        if not same:
            raise CbirError(f"encoder {encoder!r} is not the one index {self.name} was built with")
        with self._lock:
            self._encoder = encoder

    def path_of(self, id_: int) -> str:
        try:
            return self.store.paths[self._pos[int(id_)]]
        except KeyError:
            raise CbirError(f"no image with id {id_} in index {self.name}") from None

    def row_of(self, id_: int) -> int:
        """The row of image `id_` in the vectors file's columns."""
        self.path_of(id_)
        return self._pos[int(id_)]

    def id_of(self, path: str) -> int | None:
        """The id of the image at `path` (relative to the root), or None (reads every path once: slow at 10M)."""
        if self._by_path is None:
            self._by_path = {p: int(i) for p, i in zip(self.store.paths, self.store.ids, strict=True)}
        return self._by_path.get(path)

    def vector_of(self, id_: int) -> np.ndarray:
        self.path_of(id_)
        assert self.store.vectors is not None
        return np.asarray(self.store.vectors[self._pos[int(id_)]], np.float32)

    def file_of(self, id_: int) -> Path:
        return self.root / self.path_of(id_)

    # -- searching ------------------------------------------------------------------------------------
    def embed(self, query: Query, box: Box | None = None) -> np.ndarray:
        """A query (path, bytes, PIL image or ready vector) as one L2-normalised vector; `box` (x0, y0, x1, y1 in
        the picture's pixels) embeds only that region."""
        if isinstance(query, np.ndarray):
            v = np.asarray(query, np.float32).reshape(-1)
            if v.shape[0] != self.store.dim:
                raise CbirError(f"query vector has dimension {v.shape[0]}, index {self.name} has {self.store.dim}")
            return v / max(float(np.linalg.norm(v)), 1e-12)
        return self.query_encoder.embed([self.query_picture(query, box)])[0]

    def query_picture(self, query: Query, box: Box | None = None) -> Image.Image:
        """The decoded RGB picture (or its region `box`) that a query embeds: the server decodes it in the request's
        own thread, then embeds many at once."""
        if isinstance(query, Image.Image):
            im = query.convert("RGB")
        else:
            if isinstance(query, (str, os.PathLike)) and not Path(query).exists():
                raise CbirError(f"query image not found: {query}")
            try:
                src = query if not isinstance(query, io.IOBase) else query.read()
                im = load_image(src, draft=None if box else self.query_encoder.preprocess.draft_size)
            except ImageError as exc:
                raise QueryImageError(str(exc)) from exc
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

    def search_text(self, text: str, k: int = 10, image: Query | None = None,
                    exclude_ids: tuple[int, ...] = ()) -> list[Result]:
        """The k images best matching `text`; with `image` (any query), those like the picture and the text together
        ("a picture plus 'at night'": see `joint`)."""
        vector = self.embed_text(text)
        if image is not None:
            vector = joint(self.embed(image), vector)
        return self.search_vector(vector, k, exclude_ids)

    def search(self, query: Query, k: int = 10, exclude_ids: tuple[int, ...] = ()) -> list[Result]:
        """The k most similar indexed images, best first."""
        return self.search_vector(self.embed(query), k, exclude_ids)

    def search_id(self, id_: int, k: int = 10, include_self: bool = False, box: Box | None = None) -> list[Result]:
        """"More like this" for an indexed image (its stored vector; with `box`, that region of its file)."""
        vector = self.vector_of(id_) if box is None else self.embed(self.file_of(id_), box=box)
        return self.search_vector(vector, k, () if include_self else (int(id_),))

    def search_vector(self, vector: np.ndarray, k: int = 10, exclude_ids: tuple[int, ...] = ()) -> list[Result]:
        """The k nearest to `vector` (after the index's query expansion, if it has one), best first."""
        if not isinstance(k, int) or k < 1:
            raise CbirError(f"k must be a positive whole number, not {k!r}")
        query = self.expand(vector[None, :], [exclude_ids])
        scores, ids = self.searcher.search(query, k + len(exclude_ids))
        kept = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True)
                if i >= 0 and int(i) not in exclude_ids][:k]
        paths = self.paths_of([i for _, i in kept])
        return [Result(n + 1, i, p, s) for n, ((s, i), p) in enumerate(zip(kept, paths, strict=True))]

    def paths_of(self, ids: list[int]) -> list[str]:
        """The paths of several ids at once (one read of an on-disk index's path column)."""
        rows = self._pos.rows(np.asarray(ids, np.int64))
        if (rows < 0).any():
            raise CbirError(f"no image with id {ids[int(np.argmax(rows < 0))]} in index {self.name}")
        paths = self.store.paths
        return paths.take(rows) if isinstance(paths, store_mod.Strings) else [paths[int(r)] for r in rows]

    def expand(self, queries: np.ndarray, exclude: list[tuple[int, ...]] | None = None) -> np.ndarray:
        """alpha-QE of query rows [B, D] with their top neighbours (ids in `exclude[i]` left out), as the index
        records it; the rows themselves when it records none."""
        qe = self.expansion
        if not qe.qe_k:
            return np.ascontiguousarray(queries, dtype=np.float32)
        exclude = exclude or [()] * len(queries)
        extra = max((len(e) for e in exclude), default=0)
        scores, ids = self.searcher.search(queries, qe.qe_k + extra)
        picked_s = np.zeros((len(queries), qe.qe_k), np.float32)
        picked_v = np.zeros((len(queries), qe.qe_k, self.store.dim), np.float32)
        assert self.store.vectors is not None
        for row, (s, found) in enumerate(zip(scores, ids, strict=True)):
            keep = [(float(a), int(b)) for a, b in zip(s, found, strict=True) if b >= 0 and b not in exclude[row]]
            for j, (score, id_) in enumerate(keep[: qe.qe_k]):
                picked_s[row, j], picked_v[row, j] = score, self.store.vectors[self._pos[id_]]
        return combine(np.asarray(queries, np.float32), picked_v, picked_s, qe.qe_alpha)

    def summary(self) -> dict[str, Any]:
        """The few facts a list of indexes shows (the page, /api/indexes)."""
        cfg = self.encoder_config
        return {"images": len(self), "encoder": cfg["name"], "dim": cfg["dim"], "pooling": cfg["pooling"],
                "created": self.store.attrs.get("created"), "text": self.has_text}

    def info(self) -> dict[str, Any]:
        """Everything `cbir info` shows."""
        a = self.store.attrs
        return {
            "index": str(self.directory),
            "images": len(self),
            "skipped": len(self.store.skipped),
            "dim": self.store.dim,
            "root": a.get("root"),
            "encoder": self.encoder_config,
            "created": a.get("created"),
            "cbir_version": a.get("cbir_version"),
            "search": {**self.searcher.plan.to_dict(), "gpu": self.searcher.gpu, "ntotal": self.searcher.ntotal},
            "vector_dtype": a.get("vector_dtype", "float32"),
            "expansion": self.expansion.to_dict(),
            "words": self.words.to_dict(),
            "preset": a.get("preset") or None,
            "seconds": float(a.get("seconds", 0.0)),
        }
