"""One search, shared by the JSON API and the page: validate, embed, search, describe the results."""

from __future__ import annotations

import time
from typing import Any

from flask import current_app, url_for

from cbir.errors import CbirError, QueryImageError
from webui.state import Busy, IndexSet


class QueryError(Exception):
    """A request that cannot be answered; `status` is the HTTP code, the message is for people."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def similarity_word(score: float) -> str:
    """Confidence in words; cosine thresholds read off the bundled samples and animals4 with the default encoder."""
    if score >= 0.85:
        return "near-duplicate"
    if score >= 0.55:
        return "similar"
    if score >= 0.35:
        return "borderline"
    return "different"


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


def indexes() -> IndexSet:
    return current_app.extensions["cbir"]


def search(index_name: str | None, k: int, image: bytes | None = None, id_: int | None = None) -> dict[str, Any]:
    state = indexes()
    try:
        index = state.get(index_name)
    except KeyError:
        raise QueryError(404, f"no index named {index_name!r}; served: {', '.join(state.names)}") from None
    name = index_name or state.default
    started = time.perf_counter()
    if id_ is not None:
        try:
            results = index.search_id(id_, k=k)
        except CbirError:
            raise QueryError(404, f"no image with id {id_} in index {name}") from None
    else:
        if not image:
            raise QueryError(400, "the upload is empty: choose an image file")
        try:
            vector = state.embed(index, image)
        except Busy:
            raise QueryError(503, "the server is busy with other searches; try again in a moment") from None
        except QueryImageError as exc:
            raise QueryError(400, f"not a usable image: {exc.reason}") from None
        except CbirError as exc:
            raise QueryError(400, str(exc)) from None
        results = index.search_vector(vector, k=k)
    took = (time.perf_counter() - started) * 1000
    return {
        "index": name,
        "encoder": index.encoder_config["name"],
        "k": k,
        "took_ms": round(took, 2),
        "query_id": id_,
        "results": [
            {
                **r.to_dict(),
                "score": round(r.score, 6),
                "similarity": similarity_word(r.score),
                "thumbnail_url": url_for("pages.thumbnail", index=name, id_=r.id),
                "image_url": url_for("pages.image", index=name, id_=r.id),
            }
            for r in results
        ],
    }
