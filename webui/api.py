"""JSON API: /api/search, /api/indexes, /api/health, /api/reload."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from webui import query

api = Blueprint("api", __name__, url_prefix="/api")


@api.errorhandler(query.QueryError)
def _query_error(exc: query.QueryError):
    return jsonify(error=exc.message, status=exc.status), exc.status


@api.route("/search", methods=["GET", "POST"])
def search():
    """POST an image, or GET ?id=N; `box=x0,y0,x1,y1` searches with that region; `index=a,b` (GET) compares;
    `text=...` searches by text (an index of a CLIP model), alone or with the picture; `folder`, `after`,
    `before`, `camera`, `tag` (repeatable) search within the images they allow; `copies=1` (POST) puts the upload's
    verified copies first and marks them."""
    k = query.parse_k(request.args.get("k"))
    index = request.args.get("index") or None
    box = query.parse_region(request.args.get("box"))
    text = request.args.get("text")
    where = query.parse_where(request.values)
    if request.method == "POST":
        image = query.uploaded_image(optional=text is not None)
        return jsonify(query.search(index, k, image=image, box=box, text=text, where=where,
                                    copies=query.parse_copies(request.args.get("copies"))))
    raw_id = request.args.get("id")
    if raw_id is None and text is None:
        raise query.QueryError(400, "GET /api/search needs ?id=N (an indexed image) or ?text=...; POST an image "
                                    "instead")
    if index and "," in index:
        if box is not None or text is not None or raw_id is None:
            raise query.QueryError(400, "comparing indexes takes ?id=N alone (no box, no text)")
        return jsonify(query.compare([n.strip() for n in index.split(",") if n.strip()], query.parse_id(raw_id), k,
                                     where=where))
    id_ = query.parse_id(raw_id) if raw_id is not None else None
    return jsonify(query.search(index, k, id_=id_, box=box, text=text, where=where))


@api.get("/indexes")
def indexes():
    """The served indexes, and those that could not be opened with the reason (`unavailable`)."""
    state = query.indexes()
    out = [{"name": served.name, **served.index.summary()} for served in state.all()]
    return jsonify(indexes=out, default=state.default, unavailable=[u.to_dict() for u in state.unavailable.values()])


@api.get("/health")
def health():
    """"warming" until every index's query model is loaded and has answered once (webui/warm.py), then "ok"."""
    state = query.indexes()
    warm = current_app.extensions["cbir_warm"].ready.is_set()
    return jsonify(status="ok" if warm else "warming", indexes=len(state.names),
                   images=sum(len(s.index) for s in state.all()), unavailable=len(state.unavailable),
                   batching=state.batcher.stats())


@api.post("/reload")
def reload():
    """Reopen indexes rebuilt on disk now (they are also picked up by themselves within a second)."""
    return jsonify(reloaded=query.indexes().reload(force=request.args.get("force") == "1"))
