"""Application factory: `create_app({"INDEXES": [...]})` loads the indexes and encoders once, at start-up."""

from __future__ import annotations

from typing import Any

from flask import Flask

DEFAULTS: dict[str, Any] = {
    "INDEXES": [],  # index folders to serve; the first is the default
    "DEVICE": "auto",
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,  # uploads over 20 MB get 413
    "RELOAD_CHECK_SECONDS": 1.0,  # how often to look for a rebuilt index on disk
    "BUSY_TIMEOUT_SECONDS": 15.0,  # wait for the encoder at most this long, then 503
    "BATCH_MAX": 16,  # concurrent query embeddings run as one batch of at most this many (1: one at a time)
    "BATCH_WAIT_MS": 4.0,  # the longest a query waits for others still decoding to join its batch
    "MAX_K": 100,
    "TOKEN": None,  # set: every page, API call, image and thumbnail needs it (see auth.py)
    "WARM_UP": True,  # load every query model and search once before health says "ok" (see warm.py)
    "MOVE_TO": None,  # the duplicate review page moves files here (cbir serve --move-to); None: it moves nothing
    "WRITABLE": False,  # POST /api/images and DELETE /api/images/<id> (see writes.py)
}


def create_app(config: dict[str, Any] | None = None) -> Flask:
    from webui.batching import Batcher
    from webui.files import ThumbnailCache
    from webui.state import IndexSet

    app = Flask(__name__)
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    app.extensions["cbir"] = IndexSet(
        [str(p) for p in app.config["INDEXES"]],
        device=app.config["DEVICE"],
        check_every=app.config["RELOAD_CHECK_SECONDS"],
        busy_timeout=app.config["BUSY_TIMEOUT_SECONDS"],
        batcher=Batcher(max_batch=int(app.config["BATCH_MAX"]), max_wait=float(app.config["BATCH_WAIT_MS"]) / 1000,
                        timeout=float(app.config["BUSY_TIMEOUT_SECONDS"])),
    )
    app.extensions["cbir_thumbs"] = ThumbnailCache()

    from webui import auth
    from webui.api import api
    from webui.pages import pages
    from webui.review import duplicates
    from webui.warm import Warmup
    from webui.writes import Uploads, writes

    auth.install(app)
    app.register_blueprint(api)
    app.register_blueprint(pages)
    app.register_blueprint(duplicates)
    app.register_blueprint(writes)
    app.extensions["cbir_uploads"] = Uploads()  # uploads committed together (writes.py)
    app.extensions["cbir_warm"] = warm = Warmup(app)
    if app.config["WARM_UP"]:
        warm.start()
    else:
        warm.ready.set()
    return app
