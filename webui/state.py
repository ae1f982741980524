"""The served indexes: loaded once, shared by all requests, swapped whole when rebuilt on disk.

A request takes a reference to the current `Index` object and uses only it, so a rebuild that lands
mid-request never mixes two indexes. `cbir index --rebuild` moves a complete folder into place, so a
reload either sees the whole new index or keeps the old one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.encoders import Encoder
from cbir.errors import CbirError
from cbir.images import Box
from cbir.index import Index, check_text
from cbir.layout import VECTORS, resolve_index_dir
from webui.batching import Batcher, Busy

__all__ = ["Busy", "IndexSet", "Served"]

log = logging.getLogger("cbir.webui")


@dataclass
class Served:
    name: str
    directory: Path
    index: Index
    signature: tuple[int, int, int]


def _signature(directory: Path) -> tuple[int, int, int]:
    st = os.stat(directory / VECTORS)
    return st.st_ino, st.st_mtime_ns, st.st_size


class IndexSet:
    """Named indexes with change detection (checked at most every `check_every` seconds)."""

    def __init__(self, paths: list[str], device: str = "cpu", check_every: float = 1.0,
                 busy_timeout: float = 15.0, batcher: Batcher | None = None) -> None:
        if not paths:
            raise CbirError("no index to serve: give at least one index folder")
        self.device = device
        self.check_every = check_every
        self._lock = threading.Lock()
        self.batcher = batcher or Batcher(timeout=busy_timeout)
        self.busy_timeout = busy_timeout
        self._last_check = 0.0
        self._served: dict[str, Served] = {}
        self._encoders: dict[str, Encoder] = {}
        for p in paths:
            directory = resolve_index_dir(p)
            name = directory.name
            if name in self._served:
                name = f"{name}-{len(self._served)}"
            self._served[name] = self._load(name, directory)

    def _load(self, name: str, directory: Path) -> Served:
        sig = _signature(directory)
        index = Index.open(directory, device=self.device)
        key = index.store.attrs["encoder_config"]
        if key in self._encoders:
            index.use_encoder(self._encoders[key])  # built once; indexes with the same encoder share it
        else:
            self._encoders[key] = index.encoder
        log.info("loaded index %s: %d images, encoder %s", name, len(index), index.encoder_config["name"])
        return Served(name, directory, index, sig)

    @property
    def names(self) -> list[str]:
        return list(self._served)

    @property
    def default(self) -> str:
        return next(iter(self._served))

    def get(self, name: str | None) -> Index:
        self._maybe_reload()
        served = self._served.get(name or self.default)
        if served is None:
            raise KeyError(name)
        return served.index

    def all(self) -> list[Served]:
        self._maybe_reload()
        return list(self._served.values())

    def reload(self, force: bool = False) -> list[str]:
        """Reopen every index whose vectors file changed; returns the names reloaded."""
        reloaded = []
        with self._lock:
            for name, served in list(self._served.items()):
                try:
                    sig = _signature(served.directory)
                    if force or sig != served.signature:
                        self._served[name] = self._load(name, served.directory)
                        reloaded.append(name)
                except (OSError, CbirError) as exc:
                    # mid-swap or broken: keep answering from the index we have
                    log.warning("index %s not reloaded (%s); still serving the previous one", name, exc)
            self._last_check = time.monotonic()
        return reloaded

    def _maybe_reload(self) -> None:
        if time.monotonic() - self._last_check >= self.check_every:
            self.reload()

    def embed(self, index: Index, data: bytes | Path, box: Box | None = None) -> np.ndarray:
        """Embed an upload (or an indexed file, for a region): decoded here, in the request's thread, then embedded
        in a batch with the other requests' queries (webui/batching.py); Busy after the configured wait."""
        enc = index.query_encoder
        with self.batcher.coming():
            pixels = enc.preprocess.pixels(index.query_picture(data, box))
        return self.batcher.embed((id(enc), "pixels"), pixels, enc.embed_pixels)

    def embed_text(self, index: Index, text: str) -> np.ndarray:
        """Embed a text query, batched like pictures (an index whose encoder has no text tower: a CbirError)."""
        text = check_text(text)
        if not index.has_text:
            return index.embed_text(text)  # says plainly why not
        enc = index.encoder
        return self.batcher.embed((id(enc), "text"), text, enc.embed_text)
