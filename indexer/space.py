"""An indexing run's writes, guarded: what the run needs on disk, and what it says when a write fails.

Any write of the run (the lock, the saved batches, the new vectors.h5 and faiss.index, on-disk lists) that fails
for want of space or rights ends the run with one `cbir.files.WriteError`: the file, the reason, about how much
the run needs and how much is free, and that nothing was lost. That holds by construction: the old index is
replaced only by renames at the very end (commit.py), and saved batches are whole files (work.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cbir.files import writing
from cbir.layout import WORK
from cbir.local_features import bytes_per_picture
from cbir.search.store import ROW_BYTES, bytes_needed

FAISS_ROW_BYTES = 8  # an id per row beside the vector


@dataclass
class Needs:
    """What the run will write, known once it is planned (zeros: not yet)."""

    rows: int = 0  # rows of the new index
    todo: int = 0  # pictures still to embed (saved as batches first)
    dim: int = 0
    itemsize: int = 4  # of a stored vector component (2: float16)
    features: bool = False  # each row's local features are kept too

    def bytes(self) -> int | None:
        """The saved batches, the new vectors file and the search index beside it, about."""
        if not self.dim:
            return None
        kept = bytes_per_picture() if self.features else 0
        batches = self.todo * (self.dim * 4 + ROW_BYTES + kept)
        return batches + bytes_needed(self.rows, self.dim, self.itemsize) + self.rows * (
            self.dim * 4 + FAISS_ROW_BYTES + kept)


@contextlib.contextmanager
def guarded(out: Path, needs: Needs) -> Iterator[None]:
    """The run's writes under `out`: a failed one is a WriteError that says nothing was lost and how to go on."""
    advice = (f"Nothing was lost: {out} keeps the index it had (if any) and what this run embedded so far (in "
              f"{out / WORK}); make room, or make the folder writable, and run the same command again: it resumes "
              "where it stopped.")
    with writing(out, needs.bytes, advice):
        yield
