"""Which files are pictures, by their first bytes rather than their names, and the decoders beyond Pillow's own.

A phone folder holds `.heic` photos, `.mov` clips and `.aae` edit files side by side; a test set may name a JPEG
`.png`. Discovery reads HEADER bytes of every file whose extension is not a known picture's (one small read: a
12 MP JPEG is never read whole to learn it is one) and keeps the file when its signature is one a decoder here
opens. HEIC/HEIF decode through pillow-heif (a dependency: phones write HEIC), AVIF through Pillow itself (built with
libavif since Pillow 11.3; pillow-heif 1.x no longer reads AVIF), camera RAW through rawpy (`pip install
-e ".[raw]"`), preferring the preview JPEG the camera embedded (a full RAW development takes seconds).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import PurePosixPath

HEADER = 32  # bytes read to tell a picture from anything else
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}
RAW_EXTENSIONS = frozenset({".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".orf", ".rw2",
                            ".raf", ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".mos", ".mrw", ".iiq", ".rwl"})
PILLOW_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                               ".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".avif", ".jp2", ".j2k", ".jpx", ".ico",
                               ".psd", ".qoi", ".dds", ".tga", ".pcx", ".sgi", ".icns"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
# Named by extension, these are decoded without sniffing first (as before: a .txt named .jpg fails to decode and is
# skipped with its reason); everything else is sniffed.
IMAGE_EXTENSIONS = PILLOW_EXTENSIONS | HEIF_EXTENSIONS | RAW_EXTENSIONS
SIDECAR_EXTENSIONS = frozenset({".xmp"})

NOT_AN_IMAGE = "not an image"
SIDECAR = "XMP sidecar (its tags are read with its picture)"
NO_RAWPY = "camera RAW: install rawpy to index these (pip install -e \".[raw]\")"

# (offset, signature, kind): kinds are "pillow", "heif", "avif" (Pillow's own), "raw"
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "pillow"), (0, b"\x89PNG\r\n\x1a\n", "pillow"), (0, b"GIF87a", "pillow"),
    (0, b"GIF89a", "pillow"), (0, b"BM", "pillow"), (0, b"II*\x00", "tiff"), (0, b"MM\x00*", "tiff"),
    (0, b"II+\x00", "tiff"), (0, b"MM\x00+", "tiff"), (0, b"8BPS", "pillow"), (0, b"qoif", "pillow"),
    (0, b"\x00\x00\x01\x00", "pillow"), (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "pillow"),
    (0, b"\xff\x4f\xff\x51", "pillow"), (0, b"DDS ", "pillow"), (0, b"icns", "pillow"), (0, b"\x01\xda", "pillow"),
    (0, b"FUJIFILMCCD-RAW", "raw"), (0, b"IIRO", "raw"), (0, b"IIRS", "raw"), (0, b"MMOR", "raw"),
    (0, b"IIU\x00", "raw"), (0, b"FOVb", "raw"), (0, b"\x00MRM", "raw"), (6, b"HEAPCCDR", "raw"),
)


def sniff(header: bytes, name: str = "") -> str | None:
    """The decoder for a file starting with `header`: "pillow", "heif", "avif" or "raw"; None when no decoder here
    reads it. A TIFF-structured file is RAW when its extension says so (CR2, NEF, ARW and DNG are TIFFs inside)."""
    for offset, signature, kind in _SIGNATURES:
        if header[offset:offset + len(signature)] == signature:
            if kind == "tiff":
                return "raw" if extension(name) in RAW_EXTENSIONS else "pillow"
            return kind
    if header[4:8] == b"ftyp":
        return _ftyp(header)
    if len(header) >= 3 and header[0:1] == b"P" and header[1:2] in b"1234567fF" and header[2:3] in b" \t\r\n#":
        return "pillow"  # Netpbm (P1-P7) and PFM
    return None


def _ftyp(header: bytes) -> str | None:
    """ISO media files: HEIF and AVIF pictures, but also MP4 and QuickTime videos and Canon's CR3 RAW."""
    size = int.from_bytes(header[0:4], "big")
    brands = {header[8:12]} | {header[i:i + 4] for i in range(16, min(size, len(header)) - 3, 4)}
    if brands & AVIF_BRANDS:
        return "avif"
    if header[8:12] == b"crx ":
        return "raw"
    if brands & HEIF_BRANDS:
        return "heif"
    return None


def extension(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def has_rawpy() -> bool:
    try:
        import rawpy  # noqa: F401
    except ImportError:
        return False
    return True


def left_out_reason(path: str | os.PathLike[str], name: str) -> str | None:
    """None when the file at `path` is a picture cbir can index, else why it is left out (one read of HEADER bytes;
    a file not readable is left to the decoder, which says so with its reason)."""
    ext = extension(name)
    kind = None
    if ext in IMAGE_EXTENSIONS:
        kind = "raw" if ext in RAW_EXTENSIONS else "pillow"
    else:
        try:
            with open(path, "rb") as fh:
                kind = sniff(fh.read(HEADER), name)
        except OSError:
            return None
    if kind is None:
        return SIDECAR if ext in SIDECAR_EXTENSIONS else NOT_AN_IMAGE
    if kind == "raw" and not has_rawpy():
        return NO_RAWPY
    return None


def left_out_by_name(name: str) -> str | None:
    """The same decision from the name alone (object-store listings, where reading every object's first bytes costs
    a request each)."""
    ext = extension(name)
    if ext in SIDECAR_EXTENSIONS:
        return SIDECAR
    if ext not in IMAGE_EXTENSIONS:
        return NOT_AN_IMAGE
    return NO_RAWPY if ext in RAW_EXTENSIONS and not has_rawpy() else None


_heif_ready = False


def enable_heif() -> None:
    """Teach Pillow to open HEIC/HEIF (pillow-heif, imported only when the first such file is met: ~40 ms)."""
    global _heif_ready
    if not _heif_ready:
        try:
            import pillow_heif
        except ImportError:
            return  # Pillow then says the format cannot be read, which is the truth
        pillow_heif.register_heif_opener()
        _heif_ready = True


def peek(source: str | os.PathLike[str] | bytes | io.IOBase) -> bytes:
    """The first HEADER bytes of a path, bytes or seekable file, leaving the file where it was."""
    if isinstance(source, bytes):
        return source[:HEADER]
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            return fh.read(HEADER)
    with contextlib.suppress(OSError, AttributeError, ValueError):
        at = source.tell()
        head = source.read(HEADER)
        source.seek(at)
        return head
    return b""


# LibRaw's `flip` -> the EXIF orientation it stands for (0: as stored, 3: 180 degrees, 5: 90 left, 6: 90 right)
_FLIP_TO_ORIENTATION = {0: 1, 3: 3, 5: 8, 6: 6}
MIN_PREVIEW = 1024  # an embedded preview at least this long on its longer side stands for the RAW file


def raw_preview(data: bytes) -> tuple[bytes | None, object | None, int, tuple[int, int]]:
    """(preview JPEG, or None; the developed picture as an RGB array when there is no usable preview; the EXIF
    orientation; the sensor's picture size as shown) of a camera RAW file's bytes. Raises ImportError without rawpy,
    ValueError when LibRaw cannot read the file."""
    import rawpy

    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            orientation = _FLIP_TO_ORIENTATION.get(int(raw.sizes.flip), 1)
            w, h = int(raw.sizes.width), int(raw.sizes.height)
            size = (h, w) if orientation in (6, 8) else (w, h)
            with contextlib.suppress(rawpy.LibRawError):
                thumb = raw.extract_thumb()
                if thumb.format == rawpy.ThumbFormat.JPEG and _jpeg_long_side(thumb.data) >= MIN_PREVIEW:
                    return bytes(thumb.data), None, orientation, size
            return None, raw.postprocess(use_camera_wb=True, half_size=True, output_bps=8), 1, size
    except rawpy.LibRawError as exc:
        raise ValueError(f"camera RAW that LibRaw cannot read ({exc.__class__.__name__})") from exc


def _jpeg_long_side(data: bytes) -> int:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return max(im.size)
    except Exception:
        return 0
