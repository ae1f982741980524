"""Plan stage: which files to embed (new, changed, not yet embedded by an interrupted run), which indexed rows go
(changed, removed), and which new files take an indexed row's vector (renamed or moved: the same bytes)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbir.files import sha256_bytes
from cbir.search import store
from cbir.search.manifest import Manifest
from cbir.search.segments import read_deletions
from indexer.source import Source


@dataclass(frozen=True, kw_only=True)
class Known:
    """An indexed file, as its row records it."""

    id: int
    size: int
    mtime_ns: int
    sha256: str


@dataclass(kw_only=True)
class Plan:
    todo: list[str] = field(default_factory=list)  # files to embed, in discovery order
    delete: list[int] = field(default_factory=list)  # ids of rows that go (changed, removed, renamed away)
    same_id: dict[str, int] = field(default_factory=dict)  # changed file -> its id (kept: it is the same picture)
    reuse: dict[str, int] = field(default_factory=dict)  # new path -> id of the row whose vector it takes
    kept_out: dict[str, tuple[int, int]] = field(default_factory=dict)  # removed by a person, file unchanged
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    resumed: int = 0  # files of `todo` that an interrupted run already embedded (see `resume`)
    retagged: int = 0  # unchanged files whose tags --tags changed (a new row each, the vector kept)


def catalog(folder: Path, manifest: Manifest) -> dict[str, Known]:
    """path -> its live row, over every segment (their columns read, no vector, no search index)."""
    known: dict[str, Known] = {}
    for entry in manifest.segments:
        s = store.read(folder / entry.vectors, vectors=False)
        live = ~np.isin(np.asarray(s.ids), read_deletions(folder, entry))
        hashes = s.sha256 if s.sha256 is not None else [""] * len(s)
        for row in np.flatnonzero(live):
            known[s.paths[row]] = Known(id=int(s.ids[row]), size=int(s.size[row]), mtime_ns=int(s.mtime_ns[row]),
                                        sha256=hashes[row])
    return known


def make_plan(source: Source, files: list[str], old: dict[str, Known] | None, *, verify: bool = False,
              removed: dict[str, tuple[int, int]] | None = None) -> Plan:
    """Everything is new without an old index; with one, a file is unchanged when its size and mtime (and with
    `verify` its sha256) are the ones recorded. `removed`: files a person removed from the index, left out while
    they are unchanged."""
    if old is None:
        return Plan(todo=list(files))
    plan = Plan()
    new: list[str] = []
    for f in files:
        known = old.get(f)
        if known is None:
            if removed and f in removed and source.stat(f) == removed[f]:
                plan.kept_out[f] = removed[f]
            else:
                new.append(f)
        elif _unchanged(source, f, known, verify):
            plan.unchanged += 1
        else:
            plan.todo.append(f)
            plan.delete.append(known.id)
            plan.same_id[f] = known.id
            plan.changed += 1
    present = set(files)
    gone = {p: k for p, k in old.items() if p not in present}
    plan.removed = len(gone)
    plan.delete += [k.id for k in gone.values()]
    plan.reuse = _renamed(source, new, gone)
    plan.todo += [f for f in new if f not in plan.reuse]
    return plan


def _unchanged(source: Source, f: str, known: Known, verify: bool) -> bool:
    st = source.stat(f)
    if st is None:
        return False
    same = st == (known.size, known.mtime_ns)
    if same and verify and known.sha256:
        same = sha256_bytes(source.read(f)[0]) == known.sha256
    return same


def _renamed(source: Source, new: list[str], gone: dict[str, Known]) -> dict[str, int]:
    """New files with the bytes of a file that went (renamed, moved): they take its vector, no embedding. Only files
    of a size that went are read to hash them."""
    by_size: dict[int, list[Known]] = defaultdict(list)
    for k in gone.values():
        if k.sha256:
            by_size[k.size].append(k)
    reuse: dict[str, int] = {}
    for f in new:
        st = source.stat(f)
        if st is None or st[0] not in by_size:
            continue
        digest = sha256_bytes(source.read(f)[0])
        match = next((k for k in by_size[st[0]] if k.sha256 == digest), None)
        if match is not None:
            reuse[f] = match.id
    return reuse


def resume(plan: Plan, source: Source, done: dict[str, tuple[int, int]]) -> list[str]:
    """The files of the plan that no saved chunk holds yet (a saved file that changed since is embedded again)."""
    remaining = []
    for f in plan.todo:
        prev = done.get(f)
        if prev is not None and (prev == (-1, -1) or prev == source.stat(f)):
            plan.resumed += 1
            continue
        remaining.append(f)
    return remaining
