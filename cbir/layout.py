"""What an index folder holds and where to find one: the file names every part of cbir agrees on.

    IDX/vectors.h5     vectors and per-image metadata (cbir.search.store)
    IDX/faiss.index    the search index over them (cbir.search.searcher)
    IDX/.work/         saved batches of an unfinished indexing run (indexer.work)
    IDX/.lock          held by the run that is writing IDX (indexer.lock)
    IDX/review.json    duplicate review: the groups a person said are not duplicates (cbir.review)
    IDX/moves.jsonl    duplicate review: files moved out of the collection, for --undo (cbir.review)
"""

from __future__ import annotations

import os
from pathlib import Path

from cbir.errors import CbirError

VECTORS = "vectors.h5"
FAISS = "faiss.index"
WORK = ".work"
LOCK = ".lock"
REVIEW = "review.json"
MOVES = "moves.jsonl"
DEFAULT_DIR = Path("indexes")


def resolve_index_dir(path: str | os.PathLike[str]) -> Path:
    """Accept the index folder, its vectors.h5, or a bare name under ./indexes/."""
    p = Path(path)
    if p.is_file() and p.name == VECTORS:
        p = p.parent
    if not p.exists() and not p.is_absolute() and (DEFAULT_DIR / p).exists():
        p = DEFAULT_DIR / p
    if not (p / VECTORS).is_file():
        if (p / WORK).is_dir():
            raise CbirError(f"no index at {path} yet: an indexing run is in progress or was interrupted; run the "
                            "same cbir index command again to finish it")
        raise CbirError(f"no index at {path} (expected {p / VECTORS}); build one with: cbir index DIR --out {path}")
    return p
