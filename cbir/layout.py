"""What an index folder holds and where to find one: the file names every part of cbir agrees on.

    IDX/manifest.json    the commit point: the live segments and the index's own facts (cbir.search.manifest)
    IDX/seg-*.h5         a segment's vectors and per-image metadata (cbir.search.store)
    IDX/seg-*.faiss      its search index (cbir.search.searcher)
    IDX/vectors.h5, IDX/faiss.index    the one segment of an index made before segments
    IDX/.work/           saved batches of an unfinished indexing run (indexer.work)
    IDX/.lock            held by the run that is writing IDX (indexer.lock)
    IDX/uploads/         images added through the web API (`cbir serve --writable`), named by content hash
    IDX/review.json      duplicate review: the groups a person said are not duplicates (cbir.review)
    IDX/moves.jsonl      duplicate review: files moved out of the collection, for --undo (cbir.review)
    IDX/moved-rows/      duplicate review: the index rows of moved files, put back by --undo (cbir.review)
"""

from __future__ import annotations

import os
from pathlib import Path

from cbir.errors import CbirError

MANIFEST = "manifest.json"
VECTORS = "vectors.h5"  # an index made before segments
FAISS = "faiss.index"
WORK = ".work"
LOCK = ".lock"
REVIEW = "review.json"
MOVES = "moves.jsonl"
MOVED_ROWS = "moved-rows"
UPLOADS = "uploads"
DEFAULT_DIR = Path("indexes")


def holds_index(folder: Path) -> bool:
    """A committed index is here: a manifest, or the vectors file of an index made before segments."""
    return (folder / MANIFEST).is_file() or (folder / VECTORS).is_file()


def resolve_index_dir(path: str | os.PathLike[str]) -> Path:
    """Accept the index folder, its manifest.json (or vectors.h5), or a bare name under ./indexes/."""
    p = Path(path)
    if p.is_file() and p.name in (MANIFEST, VECTORS):
        p = p.parent
    if not p.exists() and not p.is_absolute() and (DEFAULT_DIR / p).exists():
        p = DEFAULT_DIR / p
    if not holds_index(p):
        if (p / WORK).is_dir():
            raise CbirError(f"no index at {path} yet: an indexing run is in progress or was interrupted; run the "
                            "same cbir index command again to finish it")
        raise CbirError(f"no index at {path} (expected {p / MANIFEST}); build one with: cbir index DIR --out {path}")
    return p
