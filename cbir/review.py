"""Acting on duplicates without losing anything: which picture of a group to keep, "not duplicates" remembered, and
the others moved to a folder (never deleted) with a log that puts everything back.

Both records live in the index folder. `review.json` holds the pairs of pictures a person said are not duplicates
(by path, so a rebuilt index keeps them); `cbir duplicates` and the review page leave such pairs out for good.
`moves.jsonl` holds one line per file moved, written (and synced) before the file moves, so `--undo` can replay it
backwards after anything, a crash included: a file whose line exists but which never moved is simply still there.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cbir.errors import CbirError
from cbir.files import atomic_path, sha256_file
from cbir.layout import MOVED_ROWS, MOVES, REVIEW

if TYPE_CHECKING:
    from cbir.index import Index
    from cbir.search.writer import RowBlock

_lock = threading.Lock()  # one writer of review.json at a time in this process (the web server's threads)


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


@dataclass(kw_only=True)
class Decisions:
    """What a person decided about groups of this index: pairs of paths that are not duplicates."""

    path: Path
    not_duplicates: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def load(cls, directory: Path) -> Decisions:
        path = Path(directory) / REVIEW
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path=path)
        except (OSError, ValueError) as exc:
            raise CbirError(f"{path} cannot be read ({exc}); move it away to start the review afresh") from exc
        return cls(path=path, not_duplicates={_pair(a, b) for a, b in data.get("not_duplicates", [])})

    def separated(self, a: str, b: str) -> bool:
        """True when a person said `a` and `b` are not duplicates."""
        return _pair(a, b) in self.not_duplicates

    def mark_not_duplicates(self, paths: Sequence[str]) -> int:
        """Remember that no two of `paths` are duplicates (re-read first: another process may have added some);
        returns how many pairs are new."""
        if len(set(paths)) < 2:
            raise CbirError("'not duplicates' needs at least two pictures")
        with _lock:
            current = Decisions.load(self.path.parent)
            new = {_pair(a, b) for a, b in combinations(sorted(set(paths)), 2)} - current.not_duplicates
            self.not_duplicates = current.not_duplicates | new
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps({"not_duplicates": sorted(self.not_duplicates)}, indent=1), "utf-8")
        return len(new)


def keep_order(member: dict[str, Any]) -> tuple:
    """The default pick of a group, best first: the largest picture (most pixels: the original rather than a smaller
    copy), then the oldest (the first taken, then the first written), then the largest file, then the path."""
    return (-member.get("pixels", 0), member.get("taken_ns", 0), member.get("mtime_ns", 0), -member.get("bytes", 0),
            member["path"])


def choose_keep(members: list[dict[str, Any]]) -> int:
    """The position in `members` of the picture to keep by default (see keep_order)."""
    return min(range(len(members)), key=lambda i: keep_order(members[i]))


def set_keep(found: dict[str, Any], paths: Sequence[str]) -> None:
    """Keep these pictures in their groups (of `cbir.duplicates.find_duplicates`' answer) instead of the default."""
    wanted = set(paths)
    seen = set()
    for tier in ("identical", "near", "same_scene"):
        for group in found.get(tier, []):
            chosen = wanted & {m["path"] for m in group}
            if len(chosen) > 1:
                raise CbirError(f"--keep names two pictures of one group: {', '.join(sorted(chosen))}; keep one")
            if chosen:
                seen |= chosen
                for m in group:
                    m["keep"] = m["path"] in chosen
    if unknown := wanted - seen:
        raise CbirError(f"--keep {sorted(unknown)[0]}: not in any group (give the path as cbir duplicates lists it)")


@dataclass(kw_only=True)
class Move:
    """One file to move out of the collection (or moved, when read back from the log)."""

    id: int
    path: str  # relative to the collection's root
    source: str  # absolute paths
    target: str
    bytes: int = 0
    sha256: str = ""
    batch: str = ""

    def describe(self) -> str:
        return f"{self.source} -> {self.target}"


def plan_moves(root: Path, groups: Iterable[list[dict[str, Any]]], dest: Path,
               keep: dict[int, int] | None = None) -> list[Move]:
    """The moves that leave one picture of each group (its `keep` member, or the one marked keep) in place and put
    the others under `dest`, at the same relative path; never onto an existing file."""
    root, dest = Path(root).resolve(), Path(dest).resolve()
    if dest == root or dest.is_relative_to(root):
        raise CbirError(f"--move-to {dest} is inside the indexed folder {root}; choose a folder outside it (the next "
                        "cbir index --update would index the moved files again)")
    if root.is_relative_to(dest):
        raise CbirError(f"--move-to {dest} holds the indexed folder {root}; choose a folder outside it")
    moves: list[Move] = []
    taken: set[str] = set()
    for n, group in enumerate(groups):
        kept = (keep or {}).get(n)
        for member in group:
            if member["id"] == kept or (kept is None and member.get("keep")):
                continue
            target = _free_name(dest / member["path"], taken)
            taken.add(str(target))
            moves.append(Move(id=int(member["id"]), path=member["path"], source=str(root / member["path"]),
                              target=str(target)))
    return moves


def _free_name(target: Path, taken: set[str]) -> Path:
    """`target`, or `name (2).ext`, `name (3).ext` ... when that exists already (or is planned)."""
    candidate, n = target, 1
    while candidate.exists() or candidate.is_symlink() or str(candidate) in taken:
        n += 1
        candidate = target.with_name(f"{target.stem} ({n}){target.suffix}")
    return candidate


def move_duplicates(index: Index, moves: list[Move]) -> list[Move]:
    """Move the files and take their rows out of the index (search never returns a moved file). Their rows (ids,
    vectors, metadata) are kept in the index folder first, so that `undo_duplicate_moves` puts the index back as it
    was, not re-embedded."""
    if not moves:
        return []
    batch = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    _keep_rows(index, [m.id for m in moves], batch)
    done = apply_moves(index.directory, moves, batch)
    if done:
        index.remove([m.id for m in done])
    return done


def undo_duplicate_moves(index: Index) -> Undone:
    """Every moved file back where it was (byte for byte: the same file), and its row back into the index."""
    undone = undo_moves(index.directory)
    from indexer.live import restore

    for batch in sorted({m.batch for m in undone.restored}, reverse=True):
        path = index.directory / MOVED_ROWS / f"{batch}.npz"
        if not path.is_file():
            continue  # moved by an older cbir: --update indexes the files again
        wanted = {m.id for m in undone.restored if m.batch == batch}
        block = _read_rows(path)
        keep = np.array([int(i) in wanted for i in block.ids], bool)
        restore(index, block.take(np.flatnonzero(keep)))
        if not any(m.batch == batch for m, _ in undone.refused):
            path.unlink()
    return undone


def _keep_rows(index: Index, ids: list[int], batch: str) -> None:
    """The rows of `ids` as they are stored, in moved-rows/<batch>.npz (written whole, synced)."""
    from cbir.search.writer import raw_vectors_of

    gen = index.generation
    ids_a = np.asarray(ids, np.int64)
    columns = {"ids": ids_a, "paths": np.array(gen.paths_of(ids_a), dtype=str),
               "vectors": raw_vectors_of(gen, ids_a), "searched": gen.vectors_of(ids_a),
               "mtime_ns": np.array(gen.column("mtime_ns", ids_a), np.int64),
               "size": np.array(gen.column("size", ids_a), np.int64),
               "sha256": np.array(gen.column("sha256", ids_a), dtype=str),
               **{f"meta_{k}": v.astype(str) if v.dtype == object else v for k, v in gen.meta_of(ids_a).items()}}
    folder = index.directory / MOVED_ROWS
    folder.mkdir(exist_ok=True)
    with atomic_path(folder / f"{batch}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **columns)
        fh.flush()
        os.fsync(fh.fileno())


def _read_rows(path: Path) -> RowBlock:
    from cbir.search.writer import RowBlock

    with np.load(path) as z:
        meta = {k.removeprefix("meta_"): z[k] for k in z.files if k.startswith("meta_")}
        return RowBlock(ids=z["ids"], paths=[str(p) for p in z["paths"]], vectors=z["vectors"],
                        mtime_ns=z["mtime_ns"], size=z["size"], sha256=[str(h) for h in z["sha256"]],
                        searched=z["searched"], meta=meta)


def apply_moves(directory: Path, moves: list[Move], batch: str = "") -> list[Move]:
    """Move each file, its log line written and synced first; returns the moves made. A file that is gone, or whose
    target appeared meanwhile, is left where it is and not logged as moved."""
    done: list[Move] = []
    batch = batch or time.strftime("%Y%m%dT%H%M%S")
    with open(Path(directory) / MOVES, "a", encoding="utf-8") as log:
        for move in moves:
            source, target = Path(move.source), Path(move.target)
            if not source.is_file():
                continue
            move.bytes, move.sha256, move.batch = source.stat().st_size, sha256_file(source), batch
            log.write(json.dumps(asdict(move), sort_keys=True) + "\n")
            log.flush()
            os.fsync(log.fileno())
            try:
                move_file(source, target)
            except FileExistsError:
                continue
            done.append(move)
    return done


def move_file(source: Path, target: Path) -> None:
    """Move one file without ever overwriting: a hard link then an unlink (one file system; the link fails when the
    target exists), else an exclusive copy checked byte for byte before the source goes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise CbirError(f"cannot move {source} to {target}: {exc.strerror or exc}") from exc
        _copy_exclusive(source, target)
    os.unlink(source)


def _copy_exclusive(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    shutil.copystat(source, target)
    if sha256_file(source) != sha256_file(target):
        target.unlink()
        raise CbirError(f"copying {source} to {target} did not give the same bytes; nothing was moved")


@dataclass(kw_only=True)
class Undone:
    restored: list[Move] = field(default_factory=list)
    refused: list[tuple[Move, str]] = field(default_factory=list)  # and why


def read_log(directory: Path) -> list[Move]:
    path = Path(directory) / MOVES
    if not path.is_file():
        return []
    moves = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            moves.append(Move(**json.loads(line)))
        except (ValueError, TypeError):
            if n < len(lines):
                raise CbirError(f"{path}, line {n}, is damaged; fix or remove that line and run --undo again") \
                    from None
            # the last line, cut short by a crash while it was written: its file never moved
    return moves


def undo_moves(directory: Path) -> Undone:
    """Put every logged file back, the last moved first; never overwrite a file that is there now. The log keeps only
    the moves that could not be undone (renamed aside as moves.jsonl.undone-TIME once all are)."""
    directory = Path(directory)
    out = Undone()
    for move in reversed(read_log(directory)):
        source, target = Path(move.source), Path(move.target)
        if source.exists() and not target.exists():
            continue  # logged, but the move itself never happened
        if not target.exists():
            out.refused.append((move, f"{target} is gone"))
            continue
        try:
            move_file(target, source)
        except FileExistsError:
            out.refused.append((move, f"{source} exists again; move one of them yourself"))
            continue
        out.restored.append(move)
    log = directory / MOVES
    if log.is_file():
        if out.refused:
            with atomic_path(log) as tmp:
                tmp.write_text("".join(json.dumps(asdict(m), sort_keys=True) + "\n" for m, _ in reversed(out.refused)),
                               "utf-8")
        else:
            log.rename(log.with_name(f"{MOVES}.undone-{time.strftime('%Y%m%dT%H%M%S')}"))
    return out
