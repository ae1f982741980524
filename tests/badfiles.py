"""Generated hostile inputs: each file is made here, so the tests need nothing from the network."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# file name -> the words its skip reason must contain (None: must be indexed)
EXPECTED_SKIPS = {
    "truncated.jpg": "truncated",
    "empty.jpg": "empty file",
    "text.jpg": "not an image",
    "page.png": "not an image",
    "bomb.png": "too large",
}
EXPECTED_OK = ["palette_alpha.png", "cmyk.jpg", "sixteen_bit.png", "grey.jpg", "animated.gif", "tiny.png",
               "UPPER.JPEG", "photo.webp", "photo.tif", "photo.bmp"]


def photo(size: tuple[int, int] = (160, 120), seed: int = 0) -> Image.Image:
    """A smooth, non-trivial RGB picture (gradients plus blobs), different per seed."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, f = rng.uniform(-1, 1, 3)
        img[..., c] = 0.5 + 0.25 * np.sin(6 * f * (a * x + b * y) + c)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        img[mask] = rng.uniform(0, 1, 3)
    return Image.fromarray((img * 255).clip(0, 255).astype(np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny file that declares a 20000x20000 picture (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def write_bad_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(photo(seed=1))
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "page.png").write_text("<!doctype html><html><body>not an image</body></html>")
    (folder / "bomb.png").write_bytes(bomb_png())
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0] + [200, 30, 30] * 255)
    pal.paste(1, (32, 0, 64, 64))  # left half: index 0, transparent black; right half: opaque red
    pal.save(folder / "palette_alpha.png", transparency=0)
    photo(seed=3).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    arr16 = (np.asarray(photo(seed=4).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(arr16).save(folder / "sixteen_bit.png")
    photo(seed=5).convert("L").save(folder / "grey.jpg")
    frames = [photo(seed=s) for s in (6, 7, 8)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    photo((1, 1), seed=9).save(folder / "tiny.png")
    photo(seed=10).save(folder / "UPPER.JPEG")
    photo(seed=11).save(folder / "photo.webp")
    photo(seed=12).save(folder / "photo.tif")
    photo(seed=13).save(folder / "photo.bmp")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    (folder / ".hidden.jpg").write_bytes(good)
    (folder / "@eaDir").mkdir(exist_ok=True)
    (folder / "@eaDir" / "thumb.jpg").write_bytes(good)
    return folder
