"""The commit point of an index: `manifest.json` names its live segments, their deletions and the index's own facts.

An index folder (format 2):

    manifest.json                  this record; replaced whole (written beside, fsynced, renamed): the commit point
    seg-000001.h5                  a segment's rows (cbir.search.store), written once
    seg-000001.faiss               its search index (+ faiss-*.ivfdata, trained-*.faiss for an on-disk index)
    seg-000001.del-000004.npy      ids deleted from it as of generation 4 (sorted int64), written once

A reader opens the manifest, then the files it names; a writer writes new files first and the manifest last, so a
reader (or a run killed at any moment) sees one whole generation. Files no manifest names are left-overs of a killed
write: the next writer removes them. Row ids are global: `next_id` only grows, a merge keeps ids, a deleted id is
never used again.

An index made before segments (vectors.h5 + faiss.index, no manifest) opens as one segment (`from_legacy`); its
first write names those two files in a manifest and leaves them as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cbir.errors import CbirError
from cbir.files import atomic_path, crash_point
from cbir.layout import FAISS as LEGACY_FAISS
from cbir.layout import MANIFEST
from cbir.layout import VECTORS as LEGACY_VECTORS
from cbir.search.expansion import Expansion
from cbir.words import Words

FORMAT = 2


@dataclass(frozen=True, kw_only=True)
class SegmentEntry:
    """One live segment: its files and how many of its rows are deleted."""

    name: str  # seg-000001 (a legacy index's single segment: "vectors")
    vectors: str  # file names in the index folder
    faiss: str
    rows: int  # rows in its file, deleted ones included
    kind: str = "flat"  # its search plan's type (cbir info, the merge policy)
    deletions: str | None = None  # file of deleted ids, or None
    deleted: int = 0
    also: tuple[str, ...] = ()  # more files it needs (an on-disk index's lists and trained index)

    @property
    def live(self) -> int:
        return self.rows - self.deleted

    def files(self) -> list[str]:
        return [self.vectors, self.faiss, *self.also, *([self.deletions] if self.deletions else [])]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What every segment of an index shares, fixed when it was built (changing any of them is a --rebuild)."""

    encoder: dict[str, Any]  # the encoder's record: rebuilds it exactly (cbir.encoders.from_config)
    root: str  # the collection's folder (or s3:// prefix); paths are relative to it
    index_type: str = "auto"  # as asked: auto / flat / ivf / hnsw / ivfpq
    vector_dtype: str = "float32"
    on_disk: bool = False
    expansion: Expansion = field(default_factory=Expansion)
    words: Words = field(default_factory=Words)
    preset: str | None = None
    local_features: bool = False  # each picture's local features are kept with its row (fast verified copies)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "expansion": self.expansion.to_dict(), "words": self.words.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        return cls(**{**d, "expansion": Expansion.from_dict(d.get("expansion")),
                      "words": Words.from_dict(d.get("words"))})


@dataclass(frozen=True, kw_only=True)
class Manifest:
    generation: int
    settings: Settings
    segments: tuple[SegmentEntry, ...] = ()
    next_id: int = 0
    next_segment: int = 1
    skipped: tuple[tuple[str, str], ...] = ()  # files the last full scan left out, with the reason
    left_out: tuple[tuple[str, str, int], ...] = ()  # (reason, extension, count): files of the scan not pictures
    removed: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (size, mtime_ns) a person removed
    created: str = ""
    updated: str = ""
    cbir_version: str = ""
    seconds: float = 0.0  # the last indexing run's duration
    legacy: bool = False  # read from a vectors.h5 made before segments (no manifest.json yet)

    @property
    def live(self) -> int:
        return sum(s.live for s in self.segments)

    @property
    def deleted(self) -> int:
        return sum(s.deleted for s in self.segments)

    def files(self) -> set[str]:
        """Every file of the index this generation names (its manifest aside)."""
        return {f for s in self.segments for f in s.files()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("legacy")
        return {"format": FORMAT, **d, "settings": self.settings.to_dict(),
                "segments": [asdict(s) for s in self.segments], "skipped": [list(s) for s in self.skipped],
                "left_out": [list(x) for x in self.left_out],
                "removed": {p: list(v) for p, v in self.removed.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if int(d.get("format", 0)) > FORMAT:
            raise CbirError(f"this index was written by a newer cbir (format {d['format']}); upgrade cbir")
        fields = {k: v for k, v in d.items() if k != "format"}
        return cls(**{**fields, "settings": Settings.from_dict(d["settings"]),
                      "segments": tuple(SegmentEntry(**{**s, "also": tuple(s.get("also", ()))})
                                        for s in d["segments"]),
                      "skipped": tuple(tuple(s) for s in d.get("skipped", ())),
                      "left_out": tuple(tuple(x) for x in d.get("left_out", ())),
                      "removed": {p: tuple(v) for p, v in d.get("removed", {}).items()}})

    def next_segment_name(self) -> tuple[str, Manifest]:
        """A name no segment of this index has had, and the manifest that counts it."""
        return f"seg-{self.next_segment:06d}", replace(self, next_segment=self.next_segment + 1)


def load(folder: Path) -> Manifest:
    """The folder's current generation."""
    path = folder / MANIFEST
    if not path.is_file():
        return from_legacy(folder)
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CbirError(f"cannot read {path} ({exc}); the index cannot be opened: rebuild it with cbir index "
                        "--rebuild") from exc


def save(folder: Path, manifest: Manifest) -> None:
    """Replace the commit point: written beside, flushed to disk, renamed over the old one, folder synced."""
    with atomic_path(folder / MANIFEST) as tmp:
        with open(tmp, "w") as fh:
            json.dump(manifest.to_dict(), fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        _sync_files(folder, manifest)
        crash_point("manifest-written")
    _sync(folder)
    crash_point("manifest-replaced")


def _sync_files(folder: Path, manifest: Manifest) -> None:
    """The files a manifest names reach the disk before it does (a power cut must not leave it naming a hole)."""
    for name in manifest.files():
        if (folder / name).is_file():
            _sync(folder / name)


def _sync(path: Path) -> None:
    """fsync a file, or a folder (its entries: a rename is on disk once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def from_legacy(folder: Path) -> Manifest:
    """The manifest of an index made before segments: its vectors.h5 attributes, read once, as one segment."""
    from cbir.search.store import read_legacy_facts

    facts = read_legacy_facts(folder / LEGACY_VECTORS)
    plan = facts["plan"]
    settings = Settings(encoder=facts["encoder"], root=facts["root"], index_type=plan.requested,
                        vector_dtype=facts["vector_dtype"], on_disk=plan.type == "ivfpq-ondisk",
                        expansion=facts["expansion"], words=facts["words"], preset=facts["preset"])
    segment = SegmentEntry(name="vectors", vectors=LEGACY_VECTORS, faiss=LEGACY_FAISS, rows=facts["count"],
                           kind=plan.type)
    return Manifest(generation=0, settings=settings, segments=(segment,), next_id=facts["next_id"],
                    skipped=tuple(facts["skipped"]), created=facts["created"], updated=facts["created"],
                    cbir_version=facts["cbir_version"], seconds=facts["seconds"], legacy=True)
