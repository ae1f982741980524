"""Writes through the JSON API (`cbir serve --writable`): add an image, remove one.

    POST   /api/images?index=NAME        multipart field `image` (or a raw image body), optional field `folder`
    DELETE /api/images/<id>?index=NAME

An upload is stored under the collection's root (`cbir-uploads/[folder/]<content hash>.<ext>`, never overwriting),
embedded and committed: searchable when the answer comes. Removing an uploaded image deletes its file; removing one of
the collection's own files leaves it on disk and keeps it out of later updates until it changes (indexer/live.py).
With a token set, writes need it like everything else; without one they are served to this machine only.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

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
    try:
        added = current_app.extensions["cbir_uploads"].add(index, data, folder)
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


@dataclass(eq=False)
class _Upload:
    data: bytes
    folder: str
    added: object = None  # indexer.live.Added once committed
    error: Exception | None = None
    done: bool = False


class Uploads:
    """Group commit: uploads that arrive while a write runs are committed together by the next one (one segment, one
    manifest for all of them), each request answered once its picture is searchable. One at a time, an upload's write
    took ~330 ms on 2 cores beside 8 searching clients: 3 uploads a second of the 5 offered
    (benchmarks/update_cost.py load)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._waiting: dict[str, list[_Upload]] = {}
        self._leaders: dict[str, threading.Lock] = {}

    def add(self, index, data: bytes, folder: str):
        key = str(index.directory)
        job = _Upload(data=data, folder=folder)
        with self._guard:
            self._waiting.setdefault(key, []).append(job)
            leader = self._leaders.setdefault(key, threading.Lock())
        with leader:  # the first to get it commits everything waiting, its own upload among them
            if not job.done:
                with self._guard:
                    batch = self._waiting.pop(key, [])
                _commit(index, batch)
        if job.error is not None:
            raise job.error
        return job.added

    def waiting(self) -> int:
        with self._guard:
            return sum(len(jobs) for jobs in self._waiting.values())


def _commit(index, batch: list[_Upload]) -> None:
    """Each upload stored (one that is not an image fails its own request only), then all of them as one write; if
    that write fails, each alone, so that the request at fault is the one told."""
    from indexer.live import add, store_upload

    stored: list[tuple[_Upload, Path]] = []
    try:
        for job in batch:
            try:
                stored.append((job, index.root / store_upload(index.root, job.data, job.folder)))
            except Exception as exc:
                job.error = exc
        try:
            for (job, _), added in zip(stored, add(index, [path for _, path in stored]) if stored else [], strict=True):
                job.added = added
        except Exception as exc:
            if len(stored) == 1:
                stored[0][0].error = exc
            else:
                for job, path in stored:
                    try:
                        job.added = add(index, [path])[0]
                    except Exception as one:
                        job.error = one
    finally:
        for job in batch:
            job.done = True
            if job.added is None and job.error is None:
                job.error = CbirError("the write was interrupted; try again")
