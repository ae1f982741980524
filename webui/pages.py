"""The pages (they work without JavaScript): the collection, a search, regions, side by side; images by id."""

from __future__ import annotations

import base64
import logging
import math
from pathlib import Path

import numpy as np
from flask import Blueprint, abort, current_app, jsonify, render_template, request, send_file
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from cbir.errors import ImageError
from cbir.search.filters import FilterError, Where
from webui import query
from webui.files import display_size, make_thumbnail, safe_file

pages = Blueprint("pages", __name__)
log = logging.getLogger("cbir.webui")
PAGE_SIZE = 48


def _render(status: int = 200, template: str = "page.html", **ctx):
    state = query.indexes()
    ctx.setdefault("k", 10)
    ctx.setdefault("index", state.default)
    ctx.setdefault("copies", True)
    if template == "page.html":
        ctx.update(_within(ctx["index"], ctx.get("where")))
    served = [(s.name, s.index.encoder_config["name"], len(s.index)) for s in state.all()]
    text_indexes = [s.name for s in state.all() if s.index.has_text]  # the text box shows for these only
    return render_template(template, indexes=served, text_indexes=text_indexes,
                           unavailable=list(state.unavailable.values()), max_k=current_app.config["MAX_K"],
                           max_mb=current_app.config["MAX_CONTENT_LENGTH"] // (1024 * 1024), **ctx), status


@pages.route("/", methods=["GET", "POST"])
def home():
    index = request.values.get("index") or None
    where = None
    try:
        k = query.parse_k(request.values.get("k"))
        box = query.parse_region(request.values.get("box"))
        where = query.parse_where(request.values)
        text = request.values.get("text", "").strip() or None
        if request.method == "POST":
            upload = request.files.get("image")
            data = upload.read() if upload else b""
            copies = query.parse_copies(request.values.get("copies"))
            result = query.search(index, k, image=data, box=box, text=text, where=where, copies=copies)
            preview = "data:image/jpeg;base64," + base64.b64encode(make_thumbnail(data)).decode() if data else None
            return _render(result=result, query_src=preview, k=k, index=result["index"], text=text, where=where,
                           copies=copies)
        if request.args.get("id") is not None:
            return _id_search(index, k, query.parse_id(request.args["id"]), box, where, text)
        if text is not None:  # a text search has its own URL: /?text=a+red+bicycle
            result = query.search(index, k, box=box, text=text, where=where)
            return _render(result=result, k=k, index=result["index"], text=text, where=where)
        return _collection(index, k, where)
    except query.QueryError as exc:
        return _render(exc.status, error=exc.message, index=index, where=where)
    except ImageError as exc:
        return _render(400, error=f"not a usable image: {exc}", index=index, where=where)


def _within(index: str, where: Where | None) -> dict:
    """What the "Search within" controls show: the filter, its words for links, what there is to choose from."""
    try:
        _, idx = query.get_index(index)
    except query.QueryError:
        return {"where": Where(), "where_words": {}, "facets": {}, "matched": 0, "total": 0}
    where = where or Where()
    try:
        matched = len(idx.matching(where)) if where else len(idx)
    except FilterError:  # shown with its message; the controls keep the words to correct
        matched = 0
    return {"where": where, "where_words": where.to_query(), "facets": idx.facets(), "matched": matched,
            "total": len(idx)}


def _id_search(index: str | None, k: int, id_: int, box, where: Where | None, text: str | None = None):
    result = query.search(index, k, id_=id_, box=box, text=text, where=where)
    name, idx = query.get_index(result["index"])
    path = safe_file(idx, id_)
    size = display_size(path) if path is not None else None
    return _render(result=result, query_src=f"/thumb/{name}/{id_}", query_size=size, query_id=id_, k=k, index=name,
                   compare=len(query.indexes().names) > 1, where=where, error=result.get("message"), text=text)


def _collection(index: str | None, k: int, where: Where | None):
    """The landing page: the index as a paged grid of thumbnails (in id order, or shuffled with a seed); with
    filters, the images they allow."""
    name, idx = query.get_index(index)
    try:  # an array, or a range for an on-disk index (never materialised)
        ids = idx.matching(where) if where else idx.ids()
    except FilterError as exc:
        raise query.QueryError(400, str(exc)) from None
    seed = request.args.get("shuffle", "")
    pages_total = max(1, -(-len(ids) // PAGE_SIZE))
    try:
        page = min(max(1, int(request.args.get("page", "1"))), pages_total)
    except ValueError:
        raise query.QueryError(400, "page must be a whole number") from None
    rows = np.arange((page - 1) * PAGE_SIZE, min(page * PAGE_SIZE, len(ids)))
    if seed.isdigit():
        rows = shuffled(rows, len(ids), int(seed))
    page_ids = [int(ids[r]) for r in rows]
    tiles = list(zip(page_ids, idx.paths_of(page_ids), strict=True))
    return _render(tiles=tiles, page=page, pages_total=pages_total, shuffle=seed if seed.isdigit() else "",
                   k=k, index=name, new_seed=int(np.random.default_rng().integers(1, 10**6)), where=where,
                   error=f"no image in {name} matches {where.describe()}" if where and not len(ids) else None)


def shuffled(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Where positions `rows` of a seeded shuffle of 0..n-1 point: a permutation of the whole collection, computed
    for one page only (i -> (a*i + b) mod n with a prime to n), so a 10-million-image grid shuffles in no time."""
    rng = np.random.default_rng(seed)
    a = int(rng.integers(1, max(2, n)))
    while math.gcd(a, n) != 1:
        a += 1
    b = int(rng.integers(0, max(1, n)))
    return np.array([(int(r) * a + b) % n for r in rows], np.int64)


@pages.get("/compare")
def compare():
    """One indexed image's top-k in every listed index (default: all served), in columns, overlap marked."""
    state = query.indexes()
    names = [n for n in (request.args.get("index") or ",".join(state.names)).split(",") if n]
    try:
        k = query.parse_k(request.args.get("k"))
        raw = request.args.get("id")
        if raw is None:
            raise query.QueryError(400, "compare needs ?id=N: open an image, then choose “compare”")
        found = query.compare(names, query.parse_id(raw), k)
    except query.QueryError as exc:
        return _render(exc.status, error=exc.message)
    q = found["query"]
    return _render(template="compare.html", found=found, k=k, index=q["index"],
                   query_src=f"/thumb/{q['index']}/{q['id']}")


def _served_file(index: str, id_: int) -> Path:
    """The indexed file behind (index, id), or 404: never a path from the request itself."""
    try:
        path = safe_file(query.indexes().get(index), id_)
    except KeyError:
        path = None
    if path is None:
        abort(404)
    return path


@pages.get("/image/<index>/<int:id_>")
def image(index: str, id_: int):
    return send_file(_served_file(index, id_), max_age=3600)


@pages.get("/thumb/<index>/<int:id_>")
def thumbnail(index: str, id_: int):
    path = _served_file(index, id_)
    st = path.stat()
    data = current_app.extensions["cbir_thumbs"].get((index, id_, st.st_mtime_ns, st.st_size), path)
    if data is None:
        abort(404)
    resp = current_app.response_class(data, mimetype="image/jpeg")
    resp.headers["Cache-Control"] = "public, max-age=3600"
    return resp


@pages.get("/favicon.ico")
def favicon():
    return current_app.send_static_file("favicon.svg"), 200, {"Content-Type": "image/svg+xml"}


@pages.app_errorhandler(HTTPException)
def http_error(exc: HTTPException):
    """JSON for the API, the page (with the message in plain words) for everything else."""
    message = exc.description or exc.name
    if isinstance(exc, RequestEntityTooLarge):
        limit = current_app.config["MAX_CONTENT_LENGTH"] // (1024 * 1024)
        message = f"the upload is too large: the limit is {limit} MB"
    if request.path.startswith("/api/"):
        if exc.code in (404, 405):
            message = f"{exc.name}: {request.method} {request.path} is not part of the API"
        return jsonify(error=message, status=exc.code), exc.code
    if request.path == "/" and exc.code in (400, 413):
        return _render(exc.code, error=message)
    return exc


@pages.app_errorhandler(Exception)
def unexpected(exc: Exception):
    log.exception("unexpected error on %s", request.path)
    if request.path.startswith("/api/"):
        return jsonify(error="internal error; see the server log", status=500), 500
    return "internal error; see the server log", 500
