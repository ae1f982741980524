"""Writes through the JSON API (`cbir serve --writable`): add an image, remove one.

    POST   /api/images?index=NAME        multipart field `image` (or a raw image body), optional field `folder`
    DELETE /api/images/<id>?index=NAME

An upload is stored under the collection's root (`cbir-uploads/[folder/]<content hash>.<ext>`, never overwriting),
embedded and committed: searchable when the answer comes. Removing an uploaded image deletes its file; removing one of
the collection's own files leaves it on disk and keeps it out of later updates until it changes (indexer/live.py).
With a token set, writes need it like everything else; without one they are served to this machine only.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify, request

from cbir.errors import CbirError
from webui import query
from webui.auth import is_loopback

writes = Blueprint("writes", __name__, url_prefix="/api")


@writes.errorhandler(query.QueryError)
def _query_error(exc: query.QueryError):
    return jsonify(error=exc.message, status=exc.status), exc.status


@writes.before_request
def _writable():
    if not current_app.config.get("WRITABLE"):
        raise query.QueryError(403, "this server is read-only: start it with cbir serve --writable to add and remove "
                                    "images")
    if not current_app.config.get("TOKEN") and not is_loopback(request.remote_addr or ""):
        raise query.QueryError(403, "writes without a token are taken from this machine only: set CBIR_TOKEN")
    return None


@writes.post("/images")
def add_image():
    name, index = query.get_index(request.args.get("index") or request.form.get("index") or None)
    data = query.uploaded_image()
    folder = request.form.get("folder") or request.args.get("folder") or ""
    started = time.perf_counter()
    from indexer.live import add

    try:
        added = add(index, [data], folder=folder)[0]
    except CbirError as exc:
        busy = "is writing" in str(exc)
        raise query.QueryError(503 if busy else 400, str(exc)) from None
    return jsonify(index=name, id=added.id, path=added.path, new=added.new, images=len(index),
                   took_ms=round((time.perf_counter() - started) * 1000, 2)), 201 if added.new else 200


@writes.delete("/images/<int:id_>")
def remove_image(id_: int):
    name, index = query.get_index(request.args.get("index") or None)
    try:
        path = index.path_of(id_)
    except CbirError:
        raise query.QueryError(404, f"no image with id {id_} in index {name}") from None
    from indexer.live import UPLOADS, remove

    try:
        removed = remove(index, [id_])
    except CbirError as exc:
        raise query.QueryError(503, str(exc)) from None
    if not removed:
        raise query.QueryError(404, f"no image with id {id_} in index {name}")
    return jsonify(index=name, removed=id_, path=path, file_deleted=path.startswith(f"{UPLOADS}/"),
                   images=len(index))
