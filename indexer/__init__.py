"""The ingestion pipeline, one stage per module, in the order data flows through them:

    options  what the run is asked to do (BuildOptions)
    run      the one entry point, running the stages in order: build(source, out, options) -> Summary
    plan     new / changed / removed / already embedded by an interrupted run
    decode   files -> Decoded records, in worker processes that die with the run
    embed    decoded batches -> the encoder in its numeric mode -> chunks
    work     chunks saved as they are made (an interrupted run resumes from them)
    commit   kept rows + chunks -> vectors.h5 + faiss.index, renamed into place
    lock     one writer per index folder
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from indexer.options import BuildOptions

if TYPE_CHECKING:
    from indexer.run import build
    from indexer.summary import Summary

__all__ = ["BuildOptions", "Summary", "build"]


def __getattr__(name: str) -> Any:
    # Lazy: a Ray worker that runs indexer.decode must not import torch, h5py and faiss with the package.
    if name == "build":
        from indexer.run import build

        return build
    if name == "Summary":
        from indexer.summary import Summary

        return Summary
    raise AttributeError(name)
