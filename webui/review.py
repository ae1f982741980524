"""The duplicate review page, /duplicates: three tiers kept apart (byte-identical, verified copies with their
evidence drawn, the same scene), a picture to keep per group, "not duplicates" remembered, the others moved.

Finding duplicates reads every candidate pair's files (42 s for 2,000 photos on 2 cores), so it runs in a thread per
index version and the page refreshes itself until it is done; decisions and moves apply to the answer at once.
State-changing requests must come from this site's own pages (a page elsewhere cannot make a browser move files).
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for

from cbir import review
from cbir.copies import evidence_picture
from cbir.duplicates import TIERS, find_duplicates
from cbir.errors import CbirError
from cbir.index import Index
from webui import query
from webui.files import safe_file

duplicates = Blueprint("duplicates", __name__)
TIER_TITLES = {"identical": "Byte-identical files", "near": "Verified copies", "same_scene": "Same scene"}


@dataclass(kw_only=True)
class Job:
    """One search for duplicates of one version of an index."""

    index: Index
    started: float = field(default_factory=time.monotonic)
    found: dict[str, Any] | None = None
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)


class Jobs:
    """The latest search per index (a new version of the index on disk starts a new one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    def get(self, name: str, index: Index) -> Job:
        with self._lock:
            job = self._jobs.get(name)
            if job is None or job.index is not index:
                job = self._jobs[name] = Job(index=index)
                threading.Thread(target=self._run, args=(job, index), daemon=True, name=f"duplicates {name}").start()
            return job

    @staticmethod
    def _run(job: Job, index: Index) -> None:
        try:
            job.found = find_duplicates(index)
        except CbirError as exc:
            job.error = str(exc)
        except Exception as exc:  # shown on the page, never a 500
            job.error = f"finding duplicates failed: {exc.__class__.__name__}: {exc}"
        finally:
            job.done.set()


def _jobs() -> Jobs:
    return current_app.extensions.setdefault("cbir_duplicates", Jobs())


def _visible(found: dict[str, Any], decisions: review.Decisions) -> dict[str, list[list[dict[str, Any]]]]:
    """The groups still to review: members a person separated from the group's first are dropped, and so are groups
    left with one picture (decisions made since the search, on this page or with cbir duplicates)."""
    out: dict[str, list[list[dict[str, Any]]]] = {}
    for tier in TIERS:
        groups = []
        for group in found.get(tier, []):
            first = group[0]["path"]
            kept = [group[0]] + [m for m in group[1:] if not decisions.separated(first, m["path"]) and
                                 not m.get("moved")]
            if len(kept) > 1 and not group[0].get("moved"):
                if not any(m["keep"] for m in kept):
                    kept = [{**m, "keep": n == review.choose_keep(kept)} for n, m in enumerate(kept)]
                groups.append(kept)
        out[tier] = groups
    return out


@duplicates.errorhandler(query.QueryError)
def _query_error(exc: query.QueryError):
    return render_template("duplicates.html", error=exc.message, index=request.values.get("index", ""),
                           indexes=query.indexes().names, titles=TIER_TITLES), exc.status


@duplicates.get("/duplicates")
def page():
    name, index = query.get_index(request.args.get("index") or None)
    job = _jobs().get(name, index)
    job.done.wait(timeout=float(current_app.config.get("DUPLICATES_WAIT_SECONDS", 2.0)))
    common = {"index": name, "indexes": query.indexes().names, "message": request.args.get("message", ""),
              "move_to": current_app.config.get("MOVE_TO"), "titles": TIER_TITLES}
    if not job.done.is_set():
        return render_template("duplicates.html", working=int(time.monotonic() - job.started), **common), 202
    if job.error:
        return render_template("duplicates.html", error=job.error, **common), 400
    assert job.found is not None
    tiers = _visible(job.found, review.Decisions.load(index.directory))
    return render_template("duplicates.html", tiers=tiers, **common)


def _same_origin() -> bool:
    """A browser says where a POST comes from; refuse another site's page (a form there could move files here)."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    return origin is None or urlsplit(origin).netloc == request.host


def _group_of(found: dict[str, Any], ids: set[int]) -> list[dict[str, Any]]:
    """The group of the answer that holds all of `ids` (a request acts on one group as the page showed it)."""
    for tier in TIERS:
        for group in found.get(tier, []):
            if ids <= {m["id"] for m in group}:
                return group
    raise query.QueryError(400, "those pictures are not one group of this index's duplicates (reload the page)")


@duplicates.post("/duplicates/decide")
def decide():
    if not _same_origin():
        abort(403, "this action must come from the review page of this server")
    name, index = query.get_index(request.form.get("index") or None)
    job = _jobs().get(name, index)
    if not job.done.is_set() or job.found is None:
        raise query.QueryError(409, "the search for duplicates has not finished; reload the page in a moment")
    try:
        ids = {int(v) for v in request.form.getlist("member")}
        keep = int(request.form.get("keep", "-1"))
    except ValueError:
        raise query.QueryError(400, "member and keep must be image ids") from None
    group = [m for m in _group_of(job.found, ids) if m["id"] in ids]
    action = request.form.get("action")
    if action == "not-duplicates":
        review.Decisions.load(index.directory).mark_not_duplicates([m["path"] for m in group])
        message = f"remembered: these {len(group)} pictures are not duplicates"
    elif action == "move":
        message = _move(index, group, keep)
    else:
        raise query.QueryError(400, "action must be not-duplicates or move")
    return redirect(url_for("duplicates.page", index=name, message=message), code=303)


def _move(index: Index, group: list[dict[str, Any]], keep: int) -> str:
    dest = current_app.config.get("MOVE_TO")
    if not dest:
        raise query.QueryError(400, "this server moves nothing: start it with cbir serve --move-to DIR")
    if keep not in {m["id"] for m in group}:
        raise query.QueryError(400, "choose the picture to keep; it must be one of the group")
    try:
        moves = review.plan_moves(index.root, [group], dest, keep={0: keep})
        done = review.move_duplicates(index, moves)
    except CbirError as exc:
        raise query.QueryError(400, str(exc)) from None
    moved = {m.id for m in done}
    for m in group:
        if m["id"] in moved:
            m["moved"] = True
    return f"moved {len(done)} pictures to {dest} (cbir duplicates {index.directory} --undo puts them back)"


@duplicates.get("/duplicates/evidence/<name>/<int:a>/<int:b>")
def evidence(name: str, a: int, b: int):
    """The two pictures side by side with their matching points joined (JPEG)."""
    try:
        index = query.indexes().get(name)
    except KeyError:
        abort(404)
    first, second = safe_file(index, a), safe_file(index, b)
    if first is None or second is None:
        abort(404)
    try:
        picture, _ = evidence_picture(first, second)
    except Exception:  # a file that stopped being readable
        abort(404)
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=85)
    resp = current_app.response_class(buf.getvalue(), mimetype="image/jpeg")
    resp.headers["Cache-Control"] = "private, max-age=600"
    return resp
