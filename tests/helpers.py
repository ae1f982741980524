"""Small shorthands for tests: build an index with a ready encoder, build a search index with its plan, serve."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from cbir.encoders import Encoder
from cbir.search import tuning
from cbir.search.searcher import VectorSearch
from indexer import BuildOptions, Summary, build


def build_index(root: Path, out: Path, encoder: Encoder, **options: Any) -> Summary:
    """indexer.build with `encoder` and BuildOptions(**options)."""
    return build(root, out, BuildOptions(**options), encoder=encoder)


def vector_search(vectors: np.ndarray, ids: np.ndarray, gpu: bool = False, **kwargs: Any) -> VectorSearch:
    """The search index `tuning.build` chooses (index_type=..., seed=...), ready to search."""
    index, plan = tuning.build(vectors, ids, **kwargs)
    return VectorSearch(index, plan, gpu=gpu)


def segment_files(index_dir: Path, n: int = 0) -> tuple[Path, Path]:
    """The HDF5 rows and the FAISS file of an index's n-th live segment."""
    from cbir.search import manifest

    entry = manifest.load(index_dir).segments[n]
    return index_dir / entry.vectors, index_dir / entry.faiss


def run_until_closed(srv) -> None:
    """Serve until the test closes the server: closing it under the loop's select() ends that loop with EBADF, which
    is the end asked for, not a failure (it showed as an unhandled-thread warning in another test's output)."""
    with contextlib.suppress(OSError):
        srv.run()
