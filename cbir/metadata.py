"""What is known of each picture besides its pixels, read once at index time: when it was taken, with which camera,
where, its pixel size and its tags. Stored per row as typed columns (COLUMNS) and filtered on by cbir/search/filters.

Times are wall-clock times, stored as nanoseconds as if they were UTC: a camera writes DateTimeOriginal in the local
time of the place it was in, without a zone, and a filter "after 2023-01-01" means the calendar date the user sees.
A file's modification time (the fallback when a picture has no EXIF date) is turned into this machine's local time
for the same reason.
"""

from __future__ import annotations

import csv
import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.errors import CbirError

TAG_SEPARATOR = "\n"  # tags of one row, joined (a tag never holds a line break: they are stripped on the way in)
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKE, MODEL = 0x010F, 0x0110
DATE_TIME_ORIGINAL, DATE_TIME_DIGITIZED, SUBSEC_TIME_ORIGINAL = 0x9003, 0x9004, 0x9291

# The metadata columns: name -> numpy dtype ("U" columns are UTF-8 strings in HDF5). One place: the decode workers,
# the work chunks, the stored segments and the filters all read this table.
COLUMNS: dict[str, str] = {
    "taken_ns": "int64",  # when the photo was taken (wall-clock, see above)
    "taken_exif": "bool",  # True: from the picture's EXIF; False: the file's modification time
    "make": "U",
    "model": "U",
    "lat": "float64",  # degrees, NaN when the picture has no GPS position
    "lon": "float64",
    "width": "int32",  # pixels as shown (EXIF orientation applied), full resolution
    "height": "int32",
    "own_tags": "U",  # tags the file carries (embedded XMP or its sidecar), joined with TAG_SEPARATOR
    "tags": "U",  # those and the ones given with --tags FILE.csv: what a tag filter matches
}


@dataclass(kw_only=True)
class Meta:
    """One picture's metadata."""

    taken_ns: int
    taken_exif: bool = False
    make: str = ""
    model: str = ""
    lat: float = math.nan
    lon: float = math.nan
    width: int = 0
    height: int = 0
    own_tags: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def camera(self) -> str:
        return camera_name(self.make, self.model)


def camera_name(make: str, model: str) -> str:
    """'Google' + 'Pixel 7' -> 'Google Pixel 7'; 'Canon' + 'Canon EOS R5' -> 'Canon EOS R5' (models often repeat
    the make)."""
    if not make or model.lower().startswith(make.lower().split()[0]):
        return model or make
    return f"{make} {model}" if model else make


def wall_clock_ns(moment: datetime) -> int:
    """A naive wall-clock datetime as nanoseconds, read as if it were UTC."""
    return int(moment.replace(tzinfo=UTC).timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def show_date(ns: int) -> str:
    """Wall-clock nanoseconds as the date (and time, when it is not midnight) a person writes."""
    moment = datetime.fromtimestamp(ns // 1_000_000_000, tz=UTC)
    return moment.strftime("%Y-%m-%d" if moment.strftime("%H%M%S") == "000000" else "%Y-%m-%dT%H:%M:%S")


def file_time_ns(mtime_ns: int) -> int:
    """A file's modification time as this machine's wall-clock time (see the module's note)."""
    local = datetime.fromtimestamp(mtime_ns / 1e9)
    return wall_clock_ns(local.replace(microsecond=0)) + mtime_ns % 1_000_000_000


def _exif_time(text: object, subsec: object = None) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.strptime(text.strip().rstrip("\x00")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:  # '0000:00:00 00:00:00', or a camera's own spelling
        return None
    fraction = str(subsec or "").strip().rstrip("\x00")
    extra = int(round(float("0." + fraction) * 1e9)) if fraction.isdigit() else 0
    return wall_clock_ns(moment) + extra


def _text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(str(value or "").replace("\x00", " ").split())


def _degrees(value: object, ref: object) -> float:
    try:
        d, m, s = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError, ZeroDivisionError):
        return math.nan
    sign = -1.0 if _text(ref).upper() in ("S", "W") else 1.0
    out = sign * (d + m / 60 + s / 3600)
    return out if math.isfinite(out) else math.nan


def xmp_keywords(xmp: bytes) -> list[str]:
    """The keywords of an XMP packet (dc:subject, as Lightroom, digiKam, darktable and Photos write them)."""
    found = re.search(rb"<dc:subject[^>]*>(.*?)</dc:subject>", xmp, re.S)
    if not found:
        return []
    items = re.findall(rb"<rdf:li[^>]*>(.*?)</rdf:li>", found.group(1), re.S)
    return [t for t in (clean_tag(html.unescape(i.decode("utf-8", "replace"))) for i in items) if t]


def clean_tag(tag: str) -> str:
    return " ".join(tag.split())


def read(exif: Image.Exif | None, xmp: bytes, size: tuple[int, int], mtime_ns: int,
         sidecar: bytes | None = None) -> Meta:
    """A picture's metadata from its decoded facts (cbir.images.Picture), its file's time and its XMP sidecar."""
    exif = exif if exif is not None else Image.Exif()
    try:
        sub = exif.get_ifd(EXIF_IFD)
        gps = exif.get_ifd(GPS_IFD)
    except Exception:  # a damaged EXIF block costs the metadata, never the picture
        sub, gps = {}, {}
    taken = _exif_time(sub.get(DATE_TIME_ORIGINAL), sub.get(SUBSEC_TIME_ORIGINAL)) or \
        _exif_time(sub.get(DATE_TIME_DIGITIZED))
    own = list(dict.fromkeys(xmp_keywords(xmp) + xmp_keywords(sidecar or b"")))
    lat, lon = _degrees(gps.get(2), gps.get(1)), _degrees(gps.get(4), gps.get(3))
    if math.isnan(lat) or math.isnan(lon):
        lat = lon = math.nan
    return Meta(taken_ns=taken if taken is not None else file_time_ns(mtime_ns), taken_exif=taken is not None,
                make=_text(exif.get(MAKE)), model=_text(exif.get(MODEL)), lat=lat, lon=lon, width=int(size[0]),
                height=int(size[1]), own_tags=tuple(own), tags=tuple(own))


def to_columns(metas: Sequence[Meta]) -> dict[str, np.ndarray]:
    """Rows of metadata -> the typed columns of COLUMNS."""
    out: dict[str, np.ndarray] = {}
    for name, dtype in COLUMNS.items():
        values = [getattr(m, name) for m in metas]
        if name.endswith("tags"):
            values = [TAG_SEPARATOR.join(v) for v in values]
        out[name] = np.array(values, dtype=str if dtype == "U" else dtype)
    return out


def from_columns(columns: dict[str, np.ndarray], row: int) -> Meta:
    """Row `row` of typed columns as a Meta (columns that are missing: unknown)."""
    values = {}
    for name in COLUMNS:
        if name in columns:
            v = columns[name][row]
            if name.endswith("tags"):
                values[name] = tuple(split_tags(str(v)))
            else:
                values[name] = str(v) if COLUMNS[name] == "U" else v.item()
    return Meta(**{"taken_ns": 0, **values})


def unknown_columns(mtime_ns: Sequence[int]) -> dict[str, np.ndarray]:
    """Columns for rows of which only the file time is known (rows of an index from before metadata was kept): their
    date is the file's, as for a picture without an EXIF date."""
    return to_columns([Meta(taken_ns=file_time_ns(int(m))) for m in mtime_ns])


def split_tags(joined: str) -> list[str]:
    return [t for t in joined.split(TAG_SEPARATOR) if t]


def with_tags(meta: Meta, given: Iterable[str] | None, before: Meta | None = None) -> Meta:
    """`meta` with its tags: the file's own and `given` (a --tags file's); with none given, the tags the picture's
    previous row had beyond its file's own (a changed or renamed file keeps the tags a person gave it)."""
    if given is None:
        given = [t for t in before.tags if t not in before.own_tags] if before is not None else []
    meta.tags = tuple(dict.fromkeys([*meta.own_tags, *given]))
    return meta


@dataclass(kw_only=True)
class GivenTags:
    """Tags from a `--tags FILE.csv` (a header row `path,tag`, then one row per path and tag)."""

    by_path: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def merged(self, path: str, own: Iterable[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*own, *self.by_path.get(path, ())]))


def read_tags_csv(path: str | Path) -> GivenTags:
    """Read and check a tags file; raises CbirError saying which line is wrong and how to write it."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CbirError(f"--tags {path}: cannot read it ({exc}); it must be a UTF-8 CSV file") from exc
    if not rows or [c.strip().lower() for c in rows[0]] != ["path", "tag"]:
        raise CbirError(f"--tags {path}: the first line must be the header 'path,tag', then one line per path and "
                        "tag (paths relative to the indexed folder)")
    out: dict[str, list[str]] = {}
    for n, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not clean_tag(row[1]):
            raise CbirError(f"--tags {path}, line {n}: expected 'path,tag' with both filled in, got {row!r}")
        rel = row[0].strip().replace("\\", "/").removeprefix("./")
        out.setdefault(rel, [])
        if clean_tag(row[1]) not in out[rel]:
            out[rel].append(clean_tag(row[1]))
    return GivenTags(by_path=out, source=str(path))
