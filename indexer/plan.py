"""Plan stage: which files to embed (new, changed, not yet embedded by an interrupted run) and which rows to keep."""

from __future__ import annotations

from dataclasses import dataclass, field

from cbir.files import sha256_bytes
from cbir.search.store import Store
from indexer.source import Source


@dataclass(kw_only=True)
class Plan:
    keep: dict[str, int] = field(default_factory=dict)  # path -> row of the old index, kept as it is
    todo: list[str] = field(default_factory=list)  # files to embed, in discovery order
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    resumed: int = 0  # files of `todo` that an interrupted run already embedded (see `resume`)


def make_plan(source: Source, files: list[str], old: Store | None, verify: bool = False) -> Plan:
    """Everything is new without an old index; with one, a file is unchanged when its size and mtime (and with
    `verify` its sha256) are the ones recorded."""
    if old is None:
        return Plan(todo=list(files))
    row = {p: i for i, p in enumerate(old.paths)}
    plan = Plan()
    for f in files:
        i = row.get(f)
        if i is None:
            plan.todo.append(f)
        elif _unchanged(source, f, old, i, verify):
            plan.keep[f] = i
            plan.unchanged += 1
        else:
            plan.todo.append(f)
            plan.changed += 1
    present = set(files)
    plan.removed = sum(p not in present for p in old.paths)
    return plan


def _unchanged(source: Source, f: str, old: Store, i: int, verify: bool) -> bool:
    st = source.stat(f)
    if st is None:
        return False
    same = st == (old.size[i], old.mtime_ns[i])
    if same and verify and old.sha256 is not None:
        same = sha256_bytes(source.read(f)[0]) == old.sha256[i]
    return same


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
