"""Where the embed stage runs: one interface, two engines (as clip-retrieval's distributors).

    engine = connect(options)      # LocalEngine, or indexer.distributed.RayEngine for --engine ray
    engine.embed(...)              # files -> chunks saved in the work folder
    engine.map(fn, *lists)         # independent tasks of the commit (an on-disk index's shards)
    engine.close()

The rest of the pipeline does not know which engine ran: both write the same chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from indexer.options import BuildOptions

if TYPE_CHECKING:
    from cbir.encoders import Encoder
    from indexer.decode import Decoder
    from indexer.source import Source
    from indexer.work import WorkDir


class Engine(Protocol):
    def embed(self, source: Source, files: list[str], encoder: Encoder, work: WorkDir, options: BuildOptions, *,
              planned: list[str], early: Decoder | None = None) -> None:
        """Embed `files` (those of `planned` that no saved chunk holds yet), saving chunks as they are made."""

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        """`fn` over the argument lists; results in order."""

    def close(self) -> None: ...


class LocalEngine:
    """This machine: decoding worker processes and the encoder in this process."""

    def embed(self, source: Source, files: list[str], encoder: Encoder, work: WorkDir, options: BuildOptions, *,
              planned: list[str], early: Decoder | None = None) -> None:
        from indexer.embed import embed_files

        embed_files(source, files, encoder, work, options, early)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        return list(map(fn, *iterables))

    def close(self) -> None:
        pass


def connect(options: BuildOptions) -> Engine:
    """The engine the options ask for (a Ray cluster is joined, or started for the run, here)."""
    if options.engine == "ray":
        from indexer import distributed

        return distributed.connect(options.ray_address)
    return LocalEngine()
