"""Crash-safe bookkeeping of an indexing run: a lock, and embedded batches saved as they are made.

Every finished batch is written to `<index>/.work/chunk-NNNNNN.npz` (to a temporary name, then renamed),
so a run killed at any moment, even by SIGKILL, leaves only whole chunks behind. Re-running the same
command finds them (same encoder and root, recorded in `manifest.json`) and embeds only what is missing.
The index files themselves are replaced only at the very end.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbir.errors import CbirError

WORK = ".work"
LOCK = ".lock"


class IndexLock:
    """Exclusive lock on an index folder for the length of a writing run (released even on SIGKILL)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK
        self.fd: int | None = None

    def __enter__(self) -> IndexLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise CbirError(f"another cbir index run (pid {holder}) is writing {self.path.parent}; wait for it to "
                            "finish, then run this again") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@dataclass
class Chunk:
    paths: list[str]
    vectors: np.ndarray
    mtime_ns: np.ndarray
    size: np.ndarray
    sha256: list[str]
    skipped: list[tuple[str, str]]


class WorkDir:
    """The chunks of one run; `open` keeps them only if they were made for the same job."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any]) -> None:
        self.dir = index_dir / WORK
        self.manifest = manifest
        self.count = 0

    def open(self) -> int:
        """Prepare the folder; returns how many chunks an earlier, interrupted run of this job left."""
        mpath = self.dir / "manifest.json"
        if self.dir.exists():
            try:
                same = json.loads(mpath.read_text()) == self.manifest
            except (OSError, ValueError):
                same = False
            if same:
                self.count = len(self._chunk_files())
                return self.count
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        tmp = mpath.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.manifest, sort_keys=True))
        os.replace(tmp, mpath)
        return 0

    def _chunk_files(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.npz"))

    def write(self, chunk: Chunk) -> None:
        self.count += 1
        final = self.dir / f"chunk-{self.count:06d}.npz"
        tmp = self.dir / f"tmp-{self.count:06d}.npz"
        with open(tmp, "wb") as fh:
            np.savez(fh, paths=np.array(chunk.paths, dtype=str), vectors=chunk.vectors,
                     mtime_ns=np.asarray(chunk.mtime_ns, np.int64), size=np.asarray(chunk.size, np.int64),
                     sha256=np.array(chunk.sha256, dtype=str),
                     skipped_path=np.array([p for p, _ in chunk.skipped], dtype=str),
                     skipped_reason=np.array([r for _, r in chunk.skipped], dtype=str))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    def chunks(self) -> Iterator[Chunk]:
        for path in self._chunk_files():
            with np.load(path) as z:
                yield Chunk([str(p) for p in z["paths"]], z["vectors"], z["mtime_ns"], z["size"],
                            [str(h) for h in z["sha256"]],
                            list(zip([str(p) for p in z["skipped_path"]], [str(r) for r in z["skipped_reason"]],
                                     strict=True)))

    def done(self) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) of every file an earlier run already embedded or skipped."""
        out: dict[str, tuple[int, int]] = {}
        for c in self.chunks():
            for p, s, m in zip(c.paths, c.size, c.mtime_ns, strict=True):
                out[p] = (int(s), int(m))
            for p, _ in c.skipped:
                out[p] = (-1, -1)
        return out

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
