"""The page (works without JavaScript: a plain form posts to /), images and thumbnails by id."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

from flask import Blueprint, abort, current_app, jsonify, render_template, request, send_file
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from cbir.images import ImageError
from webui import query
from webui.files import make_thumbnail, safe_file

pages = Blueprint("pages", __name__)
log = logging.getLogger("cbir.webui")


def _render(status: int = 200, **ctx):
    state = query.indexes()
    ctx.setdefault("k", 10)
    ctx.setdefault("index", state.default)
    served = [(s.name, s.index.encoder_config["name"], len(s.index)) for s in state.all()]
    return render_template("page.html", indexes=served, max_k=current_app.config["MAX_K"],
                           max_mb=current_app.config["MAX_CONTENT_LENGTH"] // (1024 * 1024), **ctx), status


@pages.route("/", methods=["GET", "POST"])
def home():
    index = request.values.get("index") or None
    try:
        k = query.parse_k(request.values.get("k"))
        if request.method == "POST":
            upload = request.files.get("image")
            data = upload.read() if upload else b""
            result = query.search(index, k, image=data)
            preview = "data:image/jpeg;base64," + base64.b64encode(make_thumbnail(data)).decode()
            return _render(result=result, query_src=preview, k=k, index=result["index"])
        if request.args.get("id") is not None:
            result = query.search(index, k, id_=query.parse_id(request.args["id"]))
            qsrc = f"/thumb/{result['index']}/{result['query_id']}"
            return _render(result=result, query_src=qsrc, k=k, index=result["index"])
    except query.QueryError as exc:
        return _render(exc.status, error=exc.message, index=index)
    except ImageError as exc:
        return _render(400, error=f"not a usable image: {exc}", index=index)
    return _render(k=k)


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
