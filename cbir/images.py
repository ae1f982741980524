"""Finding and decoding images: the one place that turns files into RGB pictures.

Every reader of the collection (indexer, search, web upload, training) goes through `load_image`, so an
image decodes the same way wherever it comes from, and a bad file always gets the same plain reason.
"""

from __future__ import annotations

import fnmatch
import io
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cbir.errors import CbirError, ImageError, QueryImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Folders and files that photo managers, NAS boxes and operating systems sprinkle over collections.
JUNK_NAMES = ("@eaDir", ".thumbnails", "System Volume Information", "$RECYCLE.BIN", "__MACOSX", "Thumbs.db")

# PIL's own decompression-bomb limit is kept: it raises above twice this many pixels.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True, kw_only=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Discovery:
    files: list[str]  # relative POSIX paths, sorted
    skipped: list[Skipped]
    left_out: dict[str, LeftOut] = field(default_factory=dict)  # passed over by rule (not images, hidden, excluded)

    def nothing_found(self, where: str) -> str:
        """Why a folder gave nothing to index, naming what it holds: the message of a run that writes no index."""
        kinds = ", ".join(f".{e[1:]}" for e in sorted(IMAGE_EXTENSIONS))
        text = f"found no image to index in {where} (files ending in {kinds}, in any case, in it or its folders)"
        parts = [f"{n.count} {reason} ({', '.join(n.examples)}{', ...' if n.count > len(n.examples) else ''})"
                 for reason, n in self.left_out.items()]
        parts += [f"{s.path} ({s.reason})" for s in self.skipped[:LeftOut.EXAMPLES]]
        if len(self.skipped) > LeftOut.EXAMPLES:
            parts.append(f"{len(self.skipped) - LeftOut.EXAMPLES} more skipped")
        text += "; left out: " + "; ".join(parts) if parts else "; it is empty"
        return text + ". Nothing was written."


@dataclass(kw_only=True)
class LeftOut:
    """Files of one kind that discovery passed over: how many, and the first few names (to say what they were)."""

    EXAMPLES = 3
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, rel: str) -> None:
        self.count += 1
        if len(self.examples) < self.EXAMPLES:
            self.examples.append(rel)


def is_junk(name: str, exclude: Iterable[str]) -> bool:
    if name.startswith(".") or name in JUNK_NAMES:
        return True
    return any(fnmatch.fnmatch(name, pat) for pat in exclude)


def discover(root: str | os.PathLike[str], exclude: Iterable[str] = ()) -> Discovery:
    """List image files under `root` recursively, in a deterministic order.

    Symlinked folders are followed once (a loop or a second link to the same folder is skipped);
    hidden and junk folders are ignored; `exclude` holds glob patterns matched against names and
    relative paths.
    """
    root_path = Path(root)
    if not root_path.exists():
        raise FileNotFoundError(f"folder not found: {root}")
    if not root_path.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    walker = _Walker(tuple(exclude))
    walker.walk(root_path, "")
    return Discovery(files=walker.files, skipped=walker.skipped, left_out=walker.left_out)


class _Walker:
    def __init__(self, exclude: tuple[str, ...]) -> None:
        self.exclude = exclude
        self.files: list[str] = []
        self.skipped: list[Skipped] = []
        self.left_out: dict[str, LeftOut] = {}
        self.seen_dirs: set[tuple[int, int]] = set()

    def walk(self, directory: Path, rel: str) -> None:
        try:
            st = directory.stat()
            key = (st.st_dev, st.st_ino)
            if key in self.seen_dirs:
                self.skipped.append(Skipped(path=rel, reason="folder already visited (symlink loop or duplicate link)"))
                return
            self.seen_dirs.add(key)
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            self.skipped.append(Skipped(path=rel or ".", reason=f"folder not readable: {exc.strerror or exc}"))
            return
        for entry in entries:
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            if is_junk(entry.name, self.exclude) or any(fnmatch.fnmatch(child_rel, p) for p in self.exclude):
                self._leave_out(child_rel, "hidden, system or excluded")
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                self.walk(Path(entry.path), child_rel)
            elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                self.file(entry, child_rel)
            else:
                self._leave_out(child_rel, "files not named as images")

    def _leave_out(self, rel: str, reason: str) -> None:
        self.left_out.setdefault(reason, LeftOut()).add(rel)

    def file(self, entry: os.DirEntry, rel: str) -> None:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
            self.skipped.append(Skipped(path=shown, reason="file name is not valid UTF-8"))
            return
        if entry.is_symlink() and not os.path.exists(entry.path):
            self.skipped.append(Skipped(path=rel, reason="broken symlink"))
            return
        try:
            regular = entry.is_file(follow_symlinks=True)
        except OSError:
            regular = False
        if not regular:  # a FIFO or device named .jpg would block or stream forever
            self.skipped.append(Skipped(path=rel, reason="not a regular file"))
            return
        self.files.append(rel)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited over white, not dropped."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def load_image(source: str | os.PathLike[str] | bytes | io.IOBase, draft: int | None = None) -> Image.Image:
    """Decode one image to RGB with its EXIF orientation applied.

    `draft` asks JPEG decoding for a cheaper, reduced-resolution decode that stays at least that many
    pixels on each side (a 12 MP photo decodes about 4x faster). Raises ImageError with a reason.
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty upload (0 bytes)")
        fp: io.IOBase | str | os.PathLike[str] = io.BytesIO(source)
    else:
        fp = source
        if isinstance(source, (str, os.PathLike)):
            try:
                size = os.path.getsize(source)
            except FileNotFoundError as exc:
                raise ImageError("file not found (deleted or moved)") from exc
            except OSError as exc:
                raise ImageError(f"file not readable: {exc.strerror or exc}") from exc
            if size == 0:
                raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)  # animated GIF/WebP/TIFF: the first frame stands for the file
                if draft and im.format == "JPEG":
                    im.draft("RGB", (draft, draft))
                im.load()
                im = ImageOps.exif_transpose(im) or im
                return _to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"image too large: over {2 * MAX_PIXELS:,} pixels (refused as a possible decompression bomb)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not an image, or an image format that cannot be read") from exc
    except PermissionError as exc:
        raise ImageError("file not readable: permission denied") from exc
    except FileNotFoundError as exc:
        raise ImageError("file not found (deleted or moved)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc) or exc.__class__.__name__
        if "truncated" in text.lower():
            raise ImageError("truncated image (the file ends early)") from exc
        raise ImageError(f"corrupt image: {text}") from exc


def load_query(query: str | os.PathLike[str] | bytes | io.IOBase, draft: int | None = None) -> Image.Image:
    """A query picture (a path, bytes or an open file), for every way a query comes in (search, --copies, the API):
    the one place a query's problems get their message. Raises QueryImageError, or CbirError for a missing path."""
    if isinstance(query, (str, os.PathLike)) and not Path(query).is_file():
        raise CbirError(f"query image not found: {query}" if not Path(query).exists() else
                        f"the query is not an image file but a folder or device: {query}")
    try:
        return load_image(query.read() if isinstance(query, io.IOBase) else query, draft=draft)
    except ImageError as exc:
        raise QueryImageError(str(exc)) from exc


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the picture as shown (EXIF applied)


def parse_box(text: str) -> Box:
    """'x0,y0,x1,y1' -> four numbers; raises ValueError with a plain reason."""
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"box must be four numbers x0,y0,x1,y1 in image pixels, not {text[:40]!r}") from None
    if len(parts) != 4 or not all(np.isfinite(parts)):
        raise ValueError(f"box must be four numbers x0,y0,x1,y1 in image pixels, not {text[:40]!r}")
    return parts  # type: ignore[return-value]


def crop(im: Image.Image, box: Box) -> Image.Image:
    """The region `box` of `im`; raises ValueError when it is empty or reaches outside the picture."""
    x0, y0, x1, y1 = box
    w, h = im.size
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"the box {x0:g},{y0:g},{x1:g},{y1:g} has no area (x0 < x1 and y0 < y1 are needed)")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise ValueError(f"the box {x0:g},{y0:g},{x1:g},{y1:g} reaches outside the image ({w}x{h} pixels)")
    return im.crop((round(x0), round(y0), max(round(x1), round(x0) + 1), max(round(y1), round(y0) + 1)))
