"""One search, shared by the JSON API and the page: validate, embed, search, describe the results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from flask import current_app, request, url_for

from cbir.errors import CbirError, QueryImageError
from cbir.images import Box, crop, load_query, parse_box
from cbir.index import Index, joint
from cbir.search.filters import FilterError, Where
from webui.files import safe_file
from webui.state import Busy, IndexSet


class QueryError(Exception):
    """A request that cannot be answered; `status` is the HTTP code, the message is for people."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_k(raw: str | None) -> int:
    limit = current_app.config["MAX_K"]
    if raw is None or raw == "":
        return 10
    try:
        k = int(raw)
    except ValueError:
        raise QueryError(400, f"k must be a whole number between 1 and {limit}, not {raw[:20]!r}") from None
    if not 1 <= k <= limit:
        raise QueryError(400, f"k must be between 1 and {limit}, not {k}")
    return k


def parse_id(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise QueryError(400, f"id must be a whole number, not {raw[:20]!r}") from None


def parse_region(raw: str | None) -> Box | None:
    if raw is None or raw == "":
        return None
    try:
        return parse_box(raw)
    except ValueError as exc:
        raise QueryError(400, str(exc)) from None


FILTERS = ("folder", "after", "before", "camera", "tag")  # query parameters; several combine with AND


def parse_where(values) -> Where:
    """The filters of a request (`folder`, `after`, `before`, `camera`, `tag`, repeatable), checked."""
    try:
        return Where.parse(folder=values.get("folder"), after=values.get("after"), before=values.get("before"),
                           camera=values.get("camera"), tags=values.getlist("tag"))
    except FilterError as exc:
        raise QueryError(400, str(exc)) from None


def uploaded_image(optional: bool = False) -> bytes | None:
    """The image from a multipart field `image`, or from a raw body typed image/*; None when `optional` and none
    was sent (a text query)."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("image")
        if upload is None and not optional:
            raise QueryError(400, "no file in the multipart field 'image'")
        return upload.read() if upload is not None else None
    if request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        return request.get_data(cache=False)
    if optional and not request.content_length:
        return None
    raise QueryError(
        415 if request.content_length else 400,
        "send the image as a multipart field 'image', or as the raw body with Content-Type image/jpeg, "
        "image/png, image/webp ...",
    )


def indexes() -> IndexSet:
    return current_app.extensions["cbir"]


def get_index(name: str | None) -> tuple[str, Index]:
    state = indexes()
    try:
        return name or state.default, state.get(name)
    except KeyError:
        raise QueryError(404, f"no index named {name!r}; served: {', '.join(state.names)}") from None


def parse_copies(raw: str | None) -> bool:
    """`copies=1`: an upload's verified copies first, each result saying whether it is one and why."""
    return raw in ("1", "true", "on", "yes")


def search(index_name: str | None, k: int, image: bytes | None = None, id_: int | None = None,
           box: Box | None = None, *, text: str | None = None, where: Where | None = None,
           copies: bool = False) -> dict[str, Any]:
    """A search by upload, by indexed image (`id_`), by `text`, or by a picture and a text together; `where` keeps
    to the images it allows; `copies`: an upload's verified copies first, marked."""
    name, index = get_index(index_name)
    started = time.perf_counter()
    evidence = None
    try:
        if id_ is not None:
            results = _by_id(index, name, id_, k, box, text=text, where=where)
        else:
            if not image and text is None:
                raise QueryError(400, "the upload is empty: choose an image file" +
                                 (" or type what the pictures should show" if index.has_text else ""))
            if not image and box is not None:
                raise QueryError(400, "box is a region of a picture: send the picture too")
            if copies and image and text is None:
                results, evidence = _copies_first(index, image, k, box, where)
            else:
                results = index.search_vector(_query_vector(index, image or None, box, text), k=k, where=where)
    except FilterError as exc:  # a folder, camera or tag this index does not have
        raise QueryError(400, str(exc)) from None
    found = describe(name, index, results, k, id_, box=box, text=text, words=text is None,
                     took_ms=(time.perf_counter() - started) * 1000, where=where)
    for row, e in zip(found["results"], evidence or [], strict=False):
        row["copy"] = e.to_dict()
    return found


def _copies_first(index: Index, image: bytes, k: int, box: Box | None, where: Where | None) -> tuple[list, list]:
    """The upload's verified copies first (cbir/copies.py: the index's kept local features against the query's)."""
    from cbir.copies import rank_copies_first

    try:
        picture = load_query(image)
        picture = crop(picture, box) if box is not None else picture
    except QueryImageError as exc:
        raise QueryError(400, f"not a usable image: {exc.reason}") from None
    except ValueError as exc:  # a box outside the picture
        raise QueryError(400, str(exc)) from None
    ranked = rank_copies_first(index, picture, k=k, vector=_embed(index, picture, None), where=where)
    return [r for r, _ in ranked], [e for _, e in ranked]


def _by_id(index: Index, name: str, id_: int, k: int, box: Box | None, *, text: str | None,
           where: Where | None) -> list:
    try:
        index.path_of(id_)
    except CbirError:
        raise QueryError(404, f"no image with id {id_} in index {name}") from None
    if box is None and text is None:
        return index.search_id(id_, k=k, where=where)
    if box is None:
        vector = joint(index.vector_of(id_), _embed_text(index, text or ""))
    else:
        path = safe_file(index, id_)
        if path is None:
            raise QueryError(404, f"the file of image {id_} is missing, so a region of it cannot be searched")
        vector = _query_vector(index, path, box, text)
    return index.search_vector(vector, k=k, exclude_ids=(id_,), where=where)


def _query_vector(index: Index, source: bytes | Path | None, box: Box | None, text: str | None) -> np.ndarray:
    """The query as one vector: a picture (or its region), a text, or both joined (cbir.index.joint)."""
    vector = _embed(index, source, box) if source is not None else None
    if text is None:
        assert vector is not None
        return vector
    words = _embed_text(index, text)
    return words if vector is None else joint(vector, words)


def _embed(index: Index, source, box: Box | None) -> np.ndarray:
    try:
        return indexes().embed(index, source, box)
    except Busy:
        raise QueryError(503, "the server is busy with other searches; try again in a moment") from None
    except QueryImageError as exc:
        raise QueryError(400, f"not a usable image: {exc.reason}") from None
    except CbirError as exc:  # a box outside the picture (BoxError) among them
        raise QueryError(400, str(exc)) from None


def _embed_text(index: Index, text: str) -> np.ndarray:
    try:
        return indexes().embed_text(index, text)
    except Busy:
        raise QueryError(503, "the server is busy with other searches; try again in a moment") from None
    except CbirError as exc:
        raise QueryError(400, str(exc)) from None


def describe(name: str, index: Index, results: list, k: int, id_: int | None, *, box: Box | None = None,
             text: str | None = None, words: bool = True, took_ms: float = 0.0,
             where: Where | None = None) -> dict[str, Any]:
    """The JSON of a search. `words`: say near-duplicate / similar ... (fitted on picture-to-picture cosines, so
    not for a text query, whose cosines to pictures are of another scale: null there)."""
    matched = len(index.matching(where)) if where else len(index)
    return {
        "index": name,
        "encoder": index.encoder_config["name"],
        "k": k,
        "took_ms": round(took_ms, 2),
        "query_id": id_,
        "box": list(box) if box is not None else None,
        "text": text,
        "filters": where.to_query() if where else {},
        "matched": matched,
        **({"message": f"no image in {name} matches {where.describe()}"} if where and not matched else {}),
        "results": [
            {
                **r.to_dict(),
                "score": round(r.score, 6),
                "similarity": index.words.word(r.score) if words else None,
                "thumbnail_url": url_for("pages.thumbnail", index=name, id_=r.id),
                "image_url": url_for("pages.image", index=name, id_=r.id),
            }
            for r in results
        ],
    }


def compare(names: list[str], id_: int, k: int, *, where: Where | None = None) -> dict[str, Any]:
    """The same indexed image as the query of several indexes (over the same images), side by side.

    The query is image `id_` of the first index; in the others it is the image with the same path (its stored
    vector), or, when an index lacks that path, the file embedded by that index's encoder.
    """
    first_name, first = get_index(names[0])
    try:
        path = first.path_of(id_)
    except CbirError:
        raise QueryError(404, f"no image with id {id_} in index {first_name}") from None
    columns = []
    for name in names:
        name, index = get_index(name)
        started = time.perf_counter()
        other, results = _compared(index, first, id_, path, k, where)
        columns.append(describe(name, index, results, k, other, took_ms=(time.perf_counter() - started) * 1000,
                                where=where))
    shared = set.intersection(*[{r["path"] for r in c["results"]} for c in columns]) if columns else set()
    for c in columns:
        for r in c["results"]:
            r["in_every_column"] = r["path"] in shared
    return {"query": {"index": first_name, "id": id_, "path": path}, "k": k, "columns": columns,
            "overlap": len(shared)}


def _compared(index: Index, first: Index, id_: int, path: str, k: int, where: Where | None) -> tuple[int | None, list]:
    """One column of a comparison: the image with the same path here (its stored vector), else the file embedded."""
    other = index.id_of(path)
    try:
        if other is not None:
            return other, index.search_id(other, k=k, where=where)
        file = safe_file(first, id_)
        if file is None:
            raise QueryError(404, f"the file of image {id_} is missing")
        return None, index.search_vector(_embed(index, file, None), k=k, where=where)
    except FilterError as exc:
        raise QueryError(400, str(exc)) from None
