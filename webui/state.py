"""The served indexes: loaded once, shared by all requests, moved to each new generation a writer commits.

A request works on one generation of an index (`Index.generation`, taken once), so a write that lands mid-request
never mixes two. A writer (`cbir index --update`, `cbir watch`, another server's uploads) commits a new manifest;
within a second this server opens only that generation's new segments and answers from it.
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
from cbir.layout import resolve_index_dir
from webui.batching import Batcher, Busy

__all__ = ["Busy", "IndexSet", "Served"]

log = logging.getLogger("cbir.webui")


@dataclass(kw_only=True)
class Served:
    name: str
    directory: Path
    index: Index


@dataclass(kw_only=True)
class Unavailable:
    """An index that could not be opened: shown with the reason, opened when its files change."""

    name: str
    directory: Path
    reason: str
    signature: tuple | None

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "directory": str(self.directory), "reason": self.reason}


def _signature_or_none(directory: Path) -> tuple | None:
    """The index folder's files as they are (name, inode, mtime, size each): it changes when the index is written
    again or a damaged file is put right."""
    try:
        return tuple(sorted((e.name, e.inode(), e.stat().st_mtime_ns, e.stat().st_size)
                            for e in os.scandir(directory) if e.is_file() and not e.name.startswith(".")))
    except OSError:
        return None


class IndexSet:
    """Named indexes with change detection (checked at most every `check_every` seconds)."""

    def __init__(self, paths: list[str], *, device: str, check_every: float, busy_timeout: float,
                 batcher: Batcher | None = None) -> None:
        """The settings come from the app's config (webui.app.DEFAULTS: device auto), their one default."""
        if not paths:
            raise CbirError("no index to serve: give at least one index folder")
        self.device = device
        self.check_every = check_every
        self._lock = threading.Lock()
        self.batcher = batcher or Batcher(timeout=busy_timeout)
        self.busy_timeout = busy_timeout
        self._last_check = 0.0
        self._served: dict[str, Served] = {}
        self.unavailable: dict[str, Unavailable] = {}  # one bad index does not stop the others
        self._encoders: dict[str, Encoder] = {}
        for p in paths:
            self._open(Path(p))
        if not self._served:
            raise CbirError("no index could be opened: " + "; ".join(f"{u.directory}: {u.reason}"
                                                                    for u in self.unavailable.values()))

    def _open(self, given: Path, name: str | None = None) -> bool:
        """Serve the index at `given`, or list it as unavailable with the reason."""
        if name is None:
            name = given.name
            if name in self._served or name in self.unavailable:
                name = f"{name}-{len(self._served) + len(self.unavailable)}"
        try:
            self._served[name] = self._load(name, resolve_index_dir(given))
            return True
        except (CbirError, OSError) as exc:
            log.warning("index %s is not served: %s", given, exc)
            self.unavailable[name] = Unavailable(name=name, directory=given, reason=str(exc),
                                                 signature=_signature_or_none(given))
            return False

    def _load(self, name: str, directory: Path) -> Served:
        index = Index.open(directory, device=self.device)
        self._share_encoder(index)
        log.info("loaded index %s: %d images in %d segments, encoder %s", name, len(index),
                 len(index.manifest.segments), index.encoder_config["name"])
        return Served(name=name, directory=directory, index=index)

    def _share_encoder(self, index: Index) -> None:
        """Indexes with the same encoder share one (built once)."""
        key = index.encoder_key
        if key in self._encoders:
            index.use_encoder(self._encoders[key])
        else:
            self._encoders[key] = index.encoder

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
        """Move every index to the generation committed since (only new segments are opened; `force` opens
        everything again); returns the names that changed."""
        with self._lock:
            reloaded = self._retry_unavailable(force)
            for name, served in list(self._served.items()):
                try:
                    if force:
                        self._served[name] = self._load(name, served.directory)
                    elif served.index.refresh():
                        self._share_encoder(served.index)
                    else:
                        continue
                    reloaded.append(name)
                except (OSError, CbirError) as exc:
                    # mid-write or broken: keep answering from the generation we have
                    log.warning("index %s not reloaded (%s); still serving the previous one", name, exc)
            self._last_check = time.monotonic()
        return reloaded

    def _retry_unavailable(self, force: bool) -> list[str]:
        """Open again the indexes that could not be, once their vectors file changed (rebuilt, restored)."""
        opened = []
        for name, bad in list(self.unavailable.items()):
            if force or _signature_or_none(bad.directory) != bad.signature:
                del self.unavailable[name]
                if self._open(bad.directory, name):
                    opened.append(name)
        return opened

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
