"""The edits people search with, as functions of a picture: what `cbir bench --task copies` makes copies with."""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageOps


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(im: Image.Image, keep: float = 0.7) -> Image.Image:
    w, h = im.size
    cw, ch = max(1, int(w * keep)), max(1, int(h * keep))
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch))


def _grey(im: Image.Image) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")


def _rotate(im: Image.Image) -> Image.Image:
    return im.rotate(15, resample=Image.BICUBIC, expand=True, fillcolor=(0, 0, 0))


def _canvas(im: Image.Image) -> Image.Image:
    w, h = im.size
    page = Image.new("RGB", (int(w * 1.6), int(h * 1.6)), "white")
    page.paste(im, (int(w * 0.3), int(h * 0.3)))
    return page


def _banner(im: Image.Image) -> Image.Image:
    im = im.copy()
    draw = ImageDraw.Draw(im)
    w, h = im.size
    draw.rectangle((0, int(h * 0.8), w, h), fill=(20, 20, 20))
    draw.text((max(2, w // 20), int(h * 0.84)), "SALE -50% TODAY ONLY", fill=(255, 255, 255))
    return im


def _thumbnail(im: Image.Image) -> Image.Image:
    im = im.copy()
    im.thumbnail((96, 96), Image.BICUBIC)
    return im


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize 50%": lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BICUBIC),
    "JPEG quality 20": lambda im: _jpeg(im, 20),
    "mirror": ImageOps.mirror,
    "brightness and contrast": lambda im: ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.4)).enhance(0.7),
    "crop to central 70%": _crop,
    "greyscale": _grey,
    "rotate 15 degrees": _rotate,
    "pasted on a white canvas": _canvas,
    "text banner": _banner,
    "96-px thumbnail": _thumbnail,
    "crop 70% + JPEG 30": lambda im: _jpeg(_crop(im), 30),
    "rotate 15 + greyscale": lambda im: _grey(_rotate(im)),
}
