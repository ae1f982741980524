"""Warming up before serving: each index's query model loaded and a few searches run through the app, so that the
first visitor's query is as fast as the tenth (it took 1.5 s, the rest 35 ms: the model loaded on first use).

`create_app` starts it in a thread; `/api/health` says "warming" until it is done, and `cbir serve` says it is
serving only then. Every step goes through the real app (Flask's test client: no network): the query model, the
numeric libraries' first calls, FAISS's threads, the page's template.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
from flask import Flask
from PIL import Image

log = logging.getLogger("cbir.webui")
# Searches per index: a TorchScript encoder profiles its first run and optimises at the next one (the second query
# after a one-search warm-up still took 310 ms against 67 for the rest: benchmarks/first_query.py)
SEARCHES = 3


def _picture() -> bytes:
    """A small, plain JPEG to search with (a gradient: decodable, not empty)."""
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:64, None], (1, 96)), np.full((64, 96), 128, np.uint8)],
                      axis=-1)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


class Warmup:
    """Runs once in a thread; `ready` is set when it is over (whether every step worked or not)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.ready = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self.run, name="cbir-warmup", daemon=True).start()

    def run(self) -> None:
        started = time.perf_counter()
        try:
            state = self.app.extensions["cbir"]
            token = self.app.config.get("TOKEN")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            client = self.app.test_client()
            for served in state.all():
                served.index.query_encoder  # noqa: B018 (loads the query model, outside the one-search-at-a-time lock)
                for _ in range(SEARCHES):
                    reply = client.post(f"/api/search?index={served.name}&k=1", data=_picture(), headers=headers,
                                        content_type="image/jpeg")
                if reply.status_code != 200:
                    log.warning("warming index %s: the search answered %s", served.name, reply.status_code)
            client.get("/", headers=headers)
            log.info("warmed up in %.1f s: query models loaded, %d searches per index", time.perf_counter() - started,
                     SEARCHES)
        except Exception:  # a failed warm-up costs the first visitor time, never the server
            log.exception("warming up failed; the first queries may be slow")
        finally:
            self.ready.set()


def when_ready(app: Flask, then: Callable[[], None]) -> None:
    """Call `then` from a thread once `app` is warm (`cbir serve` says it is serving only then)."""
    def wait() -> None:
        app.extensions["cbir_warm"].ready.wait()
        then()

    threading.Thread(target=wait, name="cbir-ready", daemon=True).start()
