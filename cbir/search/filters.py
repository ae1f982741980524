"""Search within: which rows a filter allows (folder, date range, camera, tags; several combine with AND).

A `Where` is parsed and checked once from the words people type (`--after 2023-01-01`, `?camera=Pixel 7`); a
`Columns` holds one segment's metadata (cbir/metadata.py) and answers `mask(where)`: a boolean per row, which the
masked search takes. Folders, cameras and tags are coded once per segment (a code per row, and per tag its rows),
so a mask over a million rows is a few vectorised comparisons, not a million string tests per query: a vector
database took 14-17 s per filtered query until it indexed the filtered field.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import numpy as np

from cbir.errors import CbirError
from cbir.metadata import TAG_SEPARATOR, camera_name, show_date, wall_clock_ns

DATE_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m",
                "%Y")
CACHED_MASKS = 32  # masks kept per segment: paging a filtered grid, or a user refining a query, asks again
SHOWN = 12  # known values named in an "unknown folder" message


class FilterError(CbirError):
    """A filter that cannot be used: a bad date, or a folder, camera or tag the index does not have."""


@dataclass(frozen=True, kw_only=True)
class Where:
    """Which images a search may return. Dates are wall-clock nanoseconds (cbir.metadata); `after` is inclusive,
    `before` exclusive: `after 2023-01-01, before 2024-01-01` is the year 2023."""

    folder: str | None = None  # relative to the collection's root; its sub-folders too
    after: int | None = None
    before: int | None = None
    camera: str | None = None  # make, model, or both, any case
    tags: tuple[str, ...] = ()  # every one of them, any case

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) not in (None, ()) for f in fields(self))

    @classmethod
    def parse(cls, *, folder: str | None = None, after: str | None = None, before: str | None = None,
              camera: str | None = None, tags: Sequence[str] = ()) -> Where:
        """From the words of a command line or a query string; raises FilterError saying how to write them."""
        start, end = parse_date(after, "after"), parse_date(before, "before")
        if start is not None and end is not None and start >= end:
            raise FilterError(f"--after {after} is not before --before {before}: no date is in that range")
        folder = (folder or "").strip().replace("\\", "/").strip("/") or None
        return cls(folder=folder, after=start, before=end, camera=" ".join((camera or "").split()) or None,
                   tags=tuple(dict.fromkeys(t.strip() for t in tags if t and t.strip())))

    def describe(self) -> str:
        """The filter in the command line's words ('--folder Holidays --after 2023-01-01')."""
        words = [f"--folder {self.folder}"] if self.folder else []
        for name in ("after", "before"):
            value = getattr(self, name)
            if value is not None:
                words.append(f"--{name} {show_date(value)}")
        words += [f"--camera {self.camera!r}"] if self.camera else []
        return " ".join(words + [f"--tag {t!r}" for t in self.tags])

    def to_query(self) -> dict[str, str | list[str]]:
        """The same filter as query parameters of /api/search and the page."""
        out: dict[str, str | list[str]] = {k: v for k, v in (("folder", self.folder), ("camera", self.camera)) if v}
        for name in ("after", "before"):
            if getattr(self, name) is not None:
                out[name] = show_date(getattr(self, name))
        if self.tags:
            out["tag"] = list(self.tags)
        return out


WhereLike = Where | Mapping[str, Any] | None


def as_where(value: WhereLike) -> Where | None:
    """A `Where`, or its words as a mapping (folder, after, before, camera, tags or tag), parsed."""
    if value is None or isinstance(value, Where):
        return value
    words = dict(value)
    tags = words.pop("tags", None) or words.pop("tag", None) or ()
    unknown = set(words) - {"folder", "after", "before", "camera"}
    if unknown:
        raise FilterError(f"unknown filter {sorted(unknown)[0]!r}: use folder, after, before, camera and tags")
    return Where.parse(**words, tags=[tags] if isinstance(tags, str) else list(tags))


def parse_date(text: str | None, name: str) -> int | None:
    if text is None or not text.strip():
        return None
    for fmt in DATE_FORMATS:
        try:
            return wall_clock_ns(datetime.strptime(text.strip(), fmt))
        except ValueError:
            continue
    raise FilterError(f"--{name}: {text[:40]!r} is not a date; write it as YYYY-MM-DD (or YYYY-MM, YYYY, or "
                      "YYYY-MM-DDTHH:MM)")


def _coded(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct values (sorted) and the code of each row."""
    table: dict[str, int] = {}
    codes = np.fromiter((table.setdefault(v, len(table)) for v in values), np.int32, count=len(values))
    names = list(table)
    order = np.argsort(np.array(names, dtype=object), kind="stable") if names else np.zeros(0, np.int64)
    recode = np.empty(len(names), np.int32)
    recode[order] = np.arange(len(names), dtype=np.int32)
    return [names[i] for i in order], recode[codes] if len(codes) else codes


class Columns:
    """One segment's rows as a filter sees them: paths (folders derive from them) and metadata columns.

    Codes are made on the first filtered query that needs them (a collection searched unfiltered pays nothing);
    the latest masks are kept, so the next page of a filtered grid costs nothing."""

    def __init__(self, paths: Sequence[str], meta: Mapping[str, np.ndarray]) -> None:
        self.paths, self.meta = paths, meta
        self.n = len(paths)
        self._lock = threading.Lock()
        self._folders: tuple[list[str], np.ndarray] | None = None
        self._cameras: tuple[list[str], np.ndarray, list[tuple[str, str]]] | None = None
        self._tags: dict[str, np.ndarray] | None = None
        self._masks: OrderedDict[Where, np.ndarray] = OrderedDict()
        self._known: dict[str, Any] = {}  # folders, camera words, tags of all rows: checked with every query

    def mask(self, where: Where) -> np.ndarray:
        """True for each row `where` allows (a read-only array: shared between requests)."""
        with self._lock:
            if where in self._masks:
                self._masks.move_to_end(where)
                return self._masks[where]
        allowed = np.ones(self.n, bool)
        if where.folder:
            allowed &= self._folder_mask(where.folder)
        if where.after is not None or where.before is not None:
            taken = self.meta["taken_ns"]
            if where.after is not None:
                allowed &= taken >= where.after
            if where.before is not None:
                allowed &= taken < where.before
        if where.camera:
            allowed &= self._camera_mask(where.camera)
        for tag in where.tags:
            allowed &= self._tag_mask(tag)
        allowed.flags.writeable = False
        with self._lock:
            self._masks[where] = allowed
            while len(self._masks) > CACHED_MASKS:
                self._masks.popitem(last=False)
        return allowed

    # -- what is there (for messages, `cbir info` and the page's choices); `live`: the rows that count ----------
    def folders(self, live: np.ndarray | None = None) -> list[str]:
        """Every folder holding a picture, and every folder above one (the root itself is no folder)."""
        names, codes = self._folder_codes()
        present = np.bincount(codes[live] if live is not None else codes, minlength=len(names)) > 0
        out = set()
        for name in (n for n, here in zip(names, present, strict=True) if here):
            parts = name.split("/") if name else []
            out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        return sorted(out)

    def cameras(self, live: np.ndarray | None = None) -> dict[str, int]:
        """Camera name -> pictures."""
        names, codes, _ = self._camera_codes()
        counts = np.bincount(codes[live] if live is not None else codes, minlength=len(names))
        return {n: int(c) for n, c in zip(names, counts, strict=True) if n and c}

    def known(self, kind: str) -> Any:
        """What a filter may name, worked out once: "folders" (a set), "cameras" and "tags" (any case -> name)."""
        with self._lock:
            found = self._known.get(kind)
        if found is None:
            found = {"folders": lambda: set(self.folders()), "cameras": self.camera_words,
                     "tags": lambda: {t.casefold(): t for t in self._tag_rows()}}[kind]()
            with self._lock:
                self._known[kind] = found
        return found

    def camera_words(self) -> dict[str, str]:
        """Every way a camera here may be named -> its name (see _camera_words)."""
        names, _, split = self._camera_codes()
        return {word: name for name, (a, b) in zip(names, split, strict=True) for word in _camera_words(name, a, b)}

    def tags(self, live: np.ndarray | None = None) -> dict[str, int]:
        """Tag -> pictures."""
        out = {t: int(live[rows].sum()) if live is not None else len(rows) for t, rows in self._tag_rows().items()}
        return {t: n for t, n in sorted(out.items()) if n}

    def dates(self, live: np.ndarray | None = None) -> dict[str, int]:
        """The first and last date taken (wall-clock ns), and how many dates came from the camera (EXIF)."""
        taken, exif = self.meta["taken_ns"], self.meta["taken_exif"]
        if live is not None:
            taken, exif = taken[live], exif[live]
        if not len(taken):
            return {}
        return {"first": int(np.min(taken)), "last": int(np.max(taken)), "from_camera": int(np.sum(exif)),
                "from_file": int(len(exif) - np.sum(exif))}

    # -- codes ---------------------------------------------------------------------------------------------------
    def _folder_codes(self) -> tuple[list[str], np.ndarray]:
        with self._lock:
            if self._folders is None:
                self._folders = _coded([p.rpartition("/")[0] for p in self.paths])
            return self._folders

    def _camera_codes(self) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
        with self._lock:
            if self._cameras is None:
                pairs = [f"{a}\x00{b}" for a, b in zip(self.meta["make"], self.meta["model"], strict=True)]
                keys, codes = _coded(pairs)
                split = [tuple(k.split("\x00", 1)) for k in keys]
                self._cameras = ([camera_name(a, b) for a, b in split], codes, split)  # type: ignore[misc]
            return self._cameras

    def _tag_rows(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._tags is None:
                rows: dict[str, list[int]] = {}
                for row, joined in enumerate(self.meta["tags"]):
                    if joined:
                        for tag in str(joined).split(TAG_SEPARATOR):
                            rows.setdefault(tag, []).append(row)
                self._tags = {t: np.array(r, np.int64) for t, r in rows.items()}
            return self._tags

    def _folder_mask(self, folder: str) -> np.ndarray:
        names, codes = self._folder_codes()
        chosen = np.array([n == folder or n.startswith(folder + "/") for n in names], bool)
        return chosen[codes] if len(codes) else np.zeros(0, bool)

    def _camera_mask(self, camera: str) -> np.ndarray:
        names, codes, split = self._camera_codes()
        want = camera.casefold()
        chosen = np.array([want in _camera_words(n, a, b) for n, (a, b) in zip(names, split, strict=True)], bool)
        return chosen[codes] if len(codes) else np.zeros(0, bool)

    def _tag_mask(self, tag: str) -> np.ndarray:
        out = np.zeros(self.n, bool)
        want = tag.casefold()
        for name, rows in self._tag_rows().items():
            if name.casefold() == want:
                out[rows] = True
        return out


def _camera_words(name: str, make: str, model: str) -> set[str]:
    """The ways a person may name a camera, any case: its name, make, model, make and model, and the model without
    the make it repeats ('EOS R5' for Canon's 'Canon EOS R5')."""
    if not name:
        return set()
    bare = model[len(make):].strip() if make and model.lower().startswith(make.lower()) else model
    return {w.casefold() for w in (name, make, model, f"{make} {model}", bare) if w.strip()}


def row_filter(where: Where) -> Callable[[Any], np.ndarray]:
    """A segment -> its rows `where` allows (for cbir.search.segments' masked search; a segment gives its Columns)."""
    return lambda segment: segment.columns().mask(where)


def check_known(where: Where, segments: Sequence[Columns]) -> None:
    """Raise FilterError when `where` names a folder, camera or tag that no segment has (a typo, most likely),
    naming the ones there are. A filter of known values that together match nothing is not an error."""
    if where.folder and not any(where.folder in c.known("folders") for c in segments):
        known = sorted({f for c in segments for f in c.known("folders")})
        raise FilterError(f"no folder {where.folder!r} in this index; folders: {_some(known)}")
    if where.camera and not any(where.camera.casefold() in c.known("cameras") for c in segments):
        names = sorted({name for c in segments for name in c.known("cameras").values()})
        raise FilterError(f"no camera {where.camera!r} in this index; cameras: {_some(names) or 'none recorded'}")
    for tag in where.tags:
        if not any(tag.casefold() in c.known("tags") for c in segments):
            names = sorted({t for c in segments for t in c.known("tags").values()}, key=str.casefold)
            raise FilterError(f"no tag {tag!r} in this index; tags: {_some(names) or 'none recorded'}")


def _some(values: list[str]) -> str:
    shown = ", ".join(repr(v) if v else "'' (the top folder)" for v in values[:SHOWN])
    return shown + (f" and {len(values) - SHOWN} more" if len(values) > SHOWN else "")
