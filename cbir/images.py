"""Finding and decoding images: the one place that turns files into RGB pictures.

Every reader of the collection (indexer, search, web upload, training) goes through `load_image` (or
`decode_image`, which also gives the header facts that metadata is read from), so an image decodes the same way
wherever it comes from, and a bad file always gets the same plain reason. Which files are pictures is decided by
their content (cbir/formats.py), not their names.
"""

from __future__ import annotations

import fnmatch
import io
import os
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cbir import formats
from cbir.errors import CbirError, ImageError, QueryImageError
from cbir.formats import IMAGE_EXTENSIONS  # noqa: F401  (where the extensions were looked up before)

# Folders and files that photo managers, NAS boxes and operating systems sprinkle over collections.
JUNK_NAMES = ("@eaDir", ".thumbnails", "System Volume Information", "$RECYCLE.BIN", "__MACOSX", "Thumbs.db")

# PIL's own decompression-bomb limit is kept: it raises above twice this many pixels.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
EXAMPLES = 3  # skipped files a message names before it counts the rest


@dataclass(frozen=True, kw_only=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Discovery:
    files: list[str]  # relative POSIX paths, sorted
    skipped: list[Skipped]
    left_out: dict[tuple[str, str], int] = field(default_factory=dict)  # (reason, extension) -> files not pictures
    hidden: int = 0  # hidden, system or excluded files passed over without a look

    def nothing_found(self, where: str) -> str:
        """Why a folder gave nothing to index, naming what it holds: the message of a run that writes no index."""
        parts = describe_left_out(self.left_out)
        parts += [f"{s.path} ({s.reason})" for s in self.skipped[:EXAMPLES]]
        if len(self.skipped) > EXAMPLES:
            parts.append(f"{len(self.skipped) - EXAMPLES} more skipped")
        if self.hidden:
            parts.append(f"{self.hidden} hidden, system or excluded")
        held = "; left out: " + "; ".join(parts) if parts else "; it is empty"
        return f"found no image to index in {where} (in it or its folders){held}. Nothing was written."


def describe_left_out(left_out: dict[tuple[str, str], int]) -> list[str]:
    """'312 .mov (not an image)' lines, most first (the run's summary and `cbir info` show them)."""
    order = sorted(left_out.items(), key=lambda item: (-item[1], item[0]))
    return [f"{n} {ext or '(no extension)'} ({reason})" for (reason, ext), n in order]


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
    return Discovery(files=walker.files, skipped=walker.skipped, left_out=dict(walker.left_out), hidden=walker.hidden)


class _Walker:
    def __init__(self, exclude: tuple[str, ...]) -> None:
        self.exclude = exclude
        self.files: list[str] = []
        self.skipped: list[Skipped] = []
        self.seen_dirs: set[tuple[int, int]] = set()
        self.left_out: Counter[tuple[str, str]] = Counter()
        self.hidden = 0

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
                self.hidden += 1
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                self.walk(Path(entry.path), child_rel)
            else:
                self.file(entry, child_rel)

    def file(self, entry: os.DirEntry, rel: str) -> None:
        """A picture joins the list; a file that cannot be one is left out and counted (by reason and extension), or
        when its name says it is a picture, skipped with its reason, as a damaged picture is."""
        problem = self._problem(entry, rel)
        if problem is None and (reason := formats.left_out_reason(entry.path, entry.name)) is not None:
            self.left_out[(reason, formats.extension(entry.name))] += 1
        elif problem is None:
            self.files.append(rel)
        elif formats.extension(entry.name) in IMAGE_EXTENSIONS:
            self.skipped.append(Skipped(path=os.fsencode(rel).decode("utf-8", "backslashreplace"), reason=problem))
        else:
            self.left_out[(problem, formats.extension(os.fsencode(entry.name).decode("utf-8", "replace")))] += 1

    @staticmethod
    def _problem(entry: os.DirEntry, rel: str) -> str | None:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            return "file name is not valid UTF-8"
        if entry.is_symlink() and not os.path.exists(entry.path):
            return "broken symlink"
        try:
            regular = entry.is_file(follow_symlinks=True)
        except OSError:
            regular = False
        return None if regular else "not a regular file"  # a FIFO named .jpg would block or stream forever


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


Source = str | os.PathLike[str] | bytes | io.IOBase


@dataclass(frozen=True, kw_only=True)
class Picture:
    """A decoded picture and the facts of its file that metadata is read from (cbir/metadata.py)."""

    image: Image.Image  # RGB, EXIF orientation applied (reduced in size when a draft was asked for)
    size: tuple[int, int]  # width, height as shown, at full resolution
    exif: Image.Exif | None = None
    xmp: bytes = b""


def load_image(source: Source, draft: int | None = None, name: str = "") -> Image.Image:
    """Decode one image to RGB with its EXIF orientation applied.

    `draft` asks JPEG decoding for a cheaper, reduced-resolution decode that stays at least that many
    pixels on each side (a 12 MP photo decodes about 4x faster). Raises ImageError with a reason.
    """
    return decode_image(source, draft, name).image


def decode_image(source: Source, draft: int | None = None, name: str = "") -> Picture:
    """`load_image`, with the file's EXIF, XMP and full size. Any format is told by its first bytes; `name` (the
    file's name, when `source` is its bytes) tells a TIFF-structured camera RAW from a TIFF."""
    fp = _opened(source)
    try:
        kind = formats.sniff(formats.peek(fp), name or (str(source) if isinstance(source, (str, os.PathLike)) else ""))
    except OSError as exc:
        raise ImageError(f"file not readable: {exc.strerror or exc}") from exc
    if kind == "heif":
        formats.enable_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if kind == "raw":
                return _decode_raw(fp, draft)
            with Image.open(fp) as im:
                return _picture(im, draft)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"image too large: over {2 * MAX_PIXELS:,} pixels (refused as a possible decompression bomb)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not an image, or an image format that cannot be read") from exc
    except ImportError as exc:
        raise ImageError(formats.NO_RAWPY) from exc
    except PermissionError as exc:
        raise ImageError("file not readable: permission denied") from exc
    except FileNotFoundError as exc:
        raise ImageError("file not found (deleted or moved)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc) or exc.__class__.__name__
        if "truncated" in text.lower():
            raise ImageError("truncated image (the file ends early)") from exc
        raise ImageError(f"corrupt image: {text}") from exc


def _opened(source: Source) -> io.IOBase | str | os.PathLike[str]:
    """`source` as Pillow takes it; an empty or missing file is refused with its reason first."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty upload (0 bytes)")
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            size = os.path.getsize(source)
        except FileNotFoundError as exc:
            raise ImageError("file not found (deleted or moved)") from exc
        except OSError as exc:
            raise ImageError(f"file not readable: {exc.strerror or exc}") from exc
        if size == 0:
            raise ImageError("empty file (0 bytes)")
    return source


def _picture(im: Image.Image, draft: int | None, orientation: int | None = None) -> Picture:
    """Decode an opened image (its first frame), facts read before anything changes them."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # animated GIF/WebP/TIFF: the first frame stands for the file
    exif, size, xmp = _facts(im, orientation)
    drafted = bool(draft) and im.format == "JPEG"
    if drafted:
        im.draft("RGB", (draft, draft))
    im.load()
    im = ImageOps.exif_transpose(im) or im
    return Picture(image=_to_rgb(im), size=size if drafted else im.size, exif=exif, xmp=xmp)


def _facts(im: Image.Image, orientation: int | None = None) -> tuple[Image.Exif, tuple[int, int], bytes]:
    """EXIF, size as shown and XMP of an opened image, from its header (nothing decoded)."""
    exif = im.getexif()
    if orientation is not None and exif.get(0x0112, 1) == 1:
        exif[0x0112] = orientation  # a camera RAW's preview turned as the RAW says
    # Pillow's TIFF reader reports (and loads) a TIFF already turned by its orientation tag; other formats are turned
    # by exif_transpose after decoding
    turned = exif.get(0x0112, 1) in (5, 6, 7, 8) and im.format != "TIFF"
    size = (im.size[1], im.size[0]) if turned else im.size
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp") or getattr(im, "tag_v2", {}).get(700, b"")
    return exif, size, xmp.encode("utf-8", "replace") if isinstance(xmp, str) else bytes(xmp or b"")


def read_facts(path: str | os.PathLike[str]) -> tuple[Image.Exif | None, tuple[int, int], bytes]:
    """EXIF, size as shown and XMP of a picture file, reading its header only (camera RAW files: none known);
    raises ImageError."""
    if formats.sniff(formats.peek(_opened(path)), str(path)) == "heif":
        formats.enable_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _facts(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read the picture's header: {exc}") from exc


def _decode_raw(fp: io.IOBase | str | os.PathLike[str], draft: int | None) -> Picture:
    """A camera RAW file: its embedded preview when it is large enough (no development), else developed at half
    size by LibRaw."""
    if isinstance(fp, (str, os.PathLike)):
        with open(fp, "rb") as fh:
            data = fh.read()
    else:
        data = fp.read()
    preview, developed, orientation, size = formats.raw_preview(data)
    exif = _tiff_exif(data)
    if preview is not None:
        with Image.open(io.BytesIO(preview)) as im:
            found = _picture(im, draft, orientation)
        return Picture(image=found.image, size=size, exif=exif or found.exif, xmp=found.xmp)
    return Picture(image=_to_rgb(Image.fromarray(developed)), size=size, exif=exif)


def _tiff_exif(data: bytes) -> Image.Exif | None:
    """The EXIF of a TIFF-structured camera RAW (CR2, NEF, ARW, DNG ...): its first IFD is an EXIF block."""
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    exif = Image.Exif()
    try:
        exif.load(data)
    except Exception:  # a maker's own layout: the picture still counts, without its camera facts
        return None
    return exif if len(exif) else None


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
