"""Write stage: embedded batches saved as they are made, so an interrupted run resumes.

Every finished batch is written to `<index>/.work/chunk-NNNNNN.npz` (to a temporary name, then renamed),
so a run killed at any moment, even by SIGKILL, leaves only whole chunks behind. Re-running the same
command finds them (same encoder and root, recorded in `manifest.json`) and embeds only what is missing.
The index files themselves are replaced only at the very end (commit.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.files import atomic_path
from cbir.layout import WORK
from cbir.local_features import Packed

META = "meta_"  # prefix of the metadata columns in a saved chunk


@dataclass(kw_only=True)
class Chunk:
    paths: list[str]
    vectors: np.ndarray
    mtime_ns: np.ndarray
    size: np.ndarray
    sha256: list[str]
    skipped: list[tuple[str, str]]
    meta: dict[str, np.ndarray] = field(default_factory=dict)  # cbir.metadata.COLUMNS of each row (saved too)
    features: Packed | None = None  # each row's local features (cbir/local_features.py), if the index keeps them


FEATURE_COLUMNS = {"kp_xy": "xy", "kp_descriptors": "descriptors", "kp_offsets": "offsets", "kp_sizes": "sizes"}


def _feature_columns(features: Packed | None) -> dict[str, np.ndarray]:
    return {} if features is None else {name: getattr(features, field) for name, field in FEATURE_COLUMNS.items()}


def _features(z: Any) -> Packed | None:
    """A saved chunk's local features (None in chunks of runs that kept none)."""
    if "kp_offsets" not in z.files:
        return None
    return Packed(**{field: z[name] for name, field in FEATURE_COLUMNS.items()})


class WorkDir:
    """The chunks of one run; `open` keeps them only if they were made for the same job."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any]) -> None:
        self.dir = Path(index_dir) / WORK
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
        with atomic_path(mpath) as tmp:
            tmp.write_text(json.dumps(self.manifest, sort_keys=True))
        return 0

    def _chunk_files(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.npz"))

    def write(self, chunk: Chunk) -> None:
        self.count += 1
        with atomic_path(self.dir / f"chunk-{self.count:06d}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, paths=np.array(chunk.paths, dtype=str), vectors=chunk.vectors,
                     mtime_ns=np.asarray(chunk.mtime_ns, np.int64), size=np.asarray(chunk.size, np.int64),
                     sha256=np.array(chunk.sha256, dtype=str),
                     skipped_path=np.array([p for p, _ in chunk.skipped], dtype=str),
                     skipped_reason=np.array([r for _, r in chunk.skipped], dtype=str),
                     **_feature_columns(chunk.features),
                     **{f"{META}{name}": column for name, column in chunk.meta.items()})
            fh.flush()
            os.fsync(fh.fileno())

    def chunks(self) -> Iterator[Chunk]:
        for path in self._chunk_files():
            with np.load(path) as z:
                yield Chunk(paths=[str(p) for p in z["paths"]], vectors=z["vectors"], mtime_ns=z["mtime_ns"],
                            size=z["size"],
                            sha256=[str(h) for h in z["sha256"]],
                            skipped=list(zip([str(p) for p in z["skipped_path"]], [str(r) for r in z["skipped_reason"]],
                                     strict=True)),
                            meta={k.removeprefix(META): z[k] for k in z.files if k.startswith(META)},
                            features=_features(z))

    def done(self) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) of every file an earlier run already embedded or skipped ((-1, -1))."""
        out: dict[str, tuple[int, int]] = {}
        for c in self.chunks():
            for p, s, m in zip(c.paths, c.size, c.mtime_ns, strict=True):
                out[p] = (int(s), int(m))
            for p, _ in c.skipped:
                out[p] = (-1, -1)
        return out

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
