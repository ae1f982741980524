"""What an indexing run is asked to do: one options record shared by every way in (CLI, API, bench)."""

from __future__ import annotations

from dataclasses import dataclass

from cbir.errors import CbirError

MODES = ("create", "rebuild", "update")
DEFAULT_ENCODER = "efficientnet_lite0"


@dataclass
class BuildOptions:
    """mode: "create" (refuses an existing index), "rebuild" (re-embeds everything) or "update" (re-embeds only
    new and changed files, drops deleted ones, keeps the ids and the encoder of the others).

    encoder / weights / pooling / precision: None means the default, or with update the index's own.
    index_type / float16: None means as the old index had them (update), else auto / float32.
    batch_size / workers: None means chosen by device, collection size and cores.
    """

    encoder: str | None = None
    weights: str | None = None
    pooling: str | None = None
    precision: str | None = None
    device: str = "auto"
    mode: str = "create"
    batch_size: int | None = None
    workers: int | None = None
    exclude: tuple[str, ...] = ()
    verify: bool = False
    index_type: str | None = None
    float16: bool | None = None
    progress: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise CbirError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CbirError("--batch-size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise CbirError("--workers must be 0 or more")
        self.exclude = tuple(self.exclude)
