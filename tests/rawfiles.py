"""Camera RAW files made here: a DNG (the open RAW format; TIFF inside) that LibRaw reads, with or without an
embedded preview JPEG. No RAW sample travels with the tests: the mosaic is made from a generated photo."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

SHORT, LONG, ASCII, BYTE, RATIONAL, SRATIONAL = 3, 4, 2, 1, 5, 10
_FORMAT = {SHORT: "H", LONG: "I", RATIONAL: "I", SRATIONAL: "i"}
Entry = tuple[int, int, object]  # tag, type, values ("blob": the IFD's data; ("ifd", n): the offset of IFD n)


def _value(typ: int, values: object) -> tuple[int, bytes]:
    if typ in (ASCII, BYTE):
        raw = values.encode() + b"\0" if isinstance(values, str) else bytes(values)  # type: ignore[arg-type]
        return len(raw), raw
    vals = list(values)  # type: ignore[call-overload]
    return len(vals) // (2 if typ in (RATIONAL, SRATIONAL) else 1), struct.pack("<" + _FORMAT[typ] * len(vals), *vals)


def tiff(ifds: list[tuple[list[Entry], bytes]]) -> bytes:
    """A little-endian TIFF of the given IFDs, each followed by its out-of-line values and its data blob."""
    laid, pos = [], 8
    for entries, blob in ifds:
        entries = sorted(entries, key=lambda e: e[0])
        extra_at = pos + 2 + 12 * len(entries) + 4
        extra, fields = bytearray(), []
        for tag, typ, values in entries:
            if values == "blob" or isinstance(values, tuple):
                fields.append((tag, typ, 1, b"", values))
                continue
            count, raw = _value(typ, values)
            if len(raw) > 4:
                raw, extra = struct.pack("<I", extra_at + len(extra)), extra + raw + b"\0" * (len(raw) % 2)
            fields.append((tag, typ, count, raw.ljust(4, b"\0"), None))
        laid.append((pos, fields, bytes(extra), extra_at + len(extra), blob))
        pos = extra_at + len(extra) + len(blob) + len(blob) % 2
    out = bytearray(b"II*\0" + struct.pack("<I", 8))
    starts = [p for p, *_ in laid]
    for _, fields, extra, blob_at, blob in laid:
        out += struct.pack("<H", len(fields))
        for tag, typ, count, raw, special in fields:
            if special == "blob":
                raw = struct.pack("<I", blob_at)
            elif special is not None:
                raw = struct.pack("<I", starts[special[1]])
            out += struct.pack("<HHI", tag, typ, count) + raw
        out += struct.pack("<I", 0) + extra + blob + b"\0" * (len(blob) % 2)
    return bytes(out)


def dng(rgb: np.ndarray, preview: np.ndarray | None = None, make: str = "cbir", model: str = "Test Camera",
        orientation: int = 1) -> bytes:
    """A DNG whose sensor saw `rgb` through an RGGB Bayer filter; with `preview`, IFD 0 is that picture as a JPEG
    (as cameras embed one) and the mosaic moves to a sub-IFD."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    rgb16 = rgb[:h, :w].astype(np.uint16) * 257
    bayer = np.empty((h, w), np.uint16)
    bayer[0::2, 0::2], bayer[0::2, 1::2] = rgb16[0::2, 0::2, 0], rgb16[0::2, 1::2, 1]
    bayer[1::2, 0::2], bayer[1::2, 1::2] = rgb16[1::2, 0::2, 1], rgb16[1::2, 1::2, 2]
    mosaic = bayer.tobytes()
    raw_ifd: list[Entry] = [
        (254, LONG, [0]), (256, LONG, [w]), (257, LONG, [h]), (258, SHORT, [16]), (259, SHORT, [1]),
        (262, SHORT, [32803]), (273, LONG, "blob"), (277, SHORT, [1]), (278, LONG, [h]), (279, LONG, [len(mosaic)]),
        (284, SHORT, [1]), (33421, SHORT, [2, 2]), (33422, BYTE, [0, 1, 1, 2]), (50717, LONG, [65535])]
    camera: list[Entry] = [
        (271, ASCII, make), (272, ASCII, model), (274, SHORT, [orientation]), (50706, BYTE, [1, 4, 0, 0]),
        (50708, ASCII, f"{make} {model}"), (50721, SRATIONAL, [1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1]),
        (50728, RATIONAL, [1, 1, 1, 1, 1, 1]), (50778, SHORT, [21])]
    if preview is None:
        return tiff([(raw_ifd + camera, mosaic)])
    buf = io.BytesIO()
    Image.fromarray(preview).save(buf, "JPEG", quality=92)
    ph, pw = preview.shape[:2]
    ifd0: list[Entry] = [
        (254, LONG, [1]), (256, LONG, [pw]), (257, LONG, [ph]), (258, SHORT, [8, 8, 8]), (259, SHORT, [7]),
        (262, SHORT, [6]), (273, LONG, "blob"), (277, SHORT, [3]), (278, LONG, [ph]),
        (279, LONG, [len(buf.getvalue())]), (330, LONG, ("ifd", 1))]
    return tiff([(ifd0 + camera, buf.getvalue()), (raw_ifd, mosaic)])
