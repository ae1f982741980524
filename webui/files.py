"""Serving indexed images and their thumbnails, by id only, never outside the index's root."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from cbir.errors import ImageError
from cbir.images import load_image, read_facts
from cbir.index import Index

THUMB_PX = 256


def safe_file(index: Index, id_: int) -> Path | None:
    """The file of image `id_`, or None if it is unknown, missing, or resolves outside the root."""
    try:
        rel = index.path_of(id_)
    except Exception:
        return None
    root = index.root.resolve()
    try:
        path = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


class ThumbnailCache:
    """JPEG thumbnails kept in memory, least recently used dropped first."""

    def __init__(self, max_items: int = 4000) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, path: Path) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        try:
            data = make_thumbnail(path)
        except ImageError:
            return None
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return data


def make_thumbnail(source: Path | bytes, px: int = THUMB_PX) -> bytes:
    im = load_image(source, draft=px)
    im.thumbnail((px, px), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=82)
    return buf.getvalue()


def display_size(path: Path) -> tuple[int, int] | None:
    """Width and height of a picture as shown (EXIF orientation applied), from its header only."""
    try:
        return read_facts(path)[1]
    except ImageError:
        return None
