"""What an indexing run is asked to do: one options record shared by every way in (CLI, API, bench)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cbir.errors import CbirError

MODES = ("create", "rebuild", "update")
ENGINES = ("local", "ray")
DEFAULT_ENCODER = "efficientnet_lite0"

# Measured configurations (benchmarks/RESULTS.md, "Presets compared"): animals4 leave-one-out P@10 through the search
# API, copy recall@1 through it, and indexing images/s on 2 cores. Expansion settings are the published ones (k=2,
# a=3). The default is `fast`: `balanced` is as fast and better at "more of this kind", worse at finding originals.
PRESETS: dict[str, dict[str, object]] = {
    "fast": {"encoder": "efficientnet_lite0", "qe": 0, "dba": 0},  # P@10 0.929, copies 0.996, the fastest
    "balanced": {"encoder": "efficientnet_lite0", "qe": 2, "dba": 2},  # P@10 0.940, copies 0.976, same speed
    "best": {"encoder": "efficientnet_lite0+efficientnet_lite2", "qe": 2, "dba": 2},  # 0.9499, 0.989, half the speed
}


DEFAULT_PRESET = "fast"


def preset_settings(name: str) -> dict[str, object]:
    """What a named preset sets; an unknown name is an error that lists the known ones."""
    if name not in PRESETS:
        raise CbirError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def mode_of(*, update: bool = False, rebuild: bool = False) -> str:
    """The build mode the update and rebuild switches ask for (`cbir index --update`, `Index.build(update=True)`)."""
    if update and rebuild:
        raise CbirError("update and rebuild exclude each other: update embeds only new and changed files, rebuild "
                        "re-embeds everything; ask for one")
    if update:
        return "update"
    return "rebuild" if rebuild else "create"


def preset_matching(encoder: str, qe: int, dba: int) -> str | None:
    """The preset an index is, whether it was named or not (recorded, so that `cbir info` can say)."""
    for name, settings in PRESETS.items():
        if (settings["encoder"], settings["qe"], settings["dba"]) == (encoder, qe, dba):
            return name
    return None


@dataclass(kw_only=True)
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
    qe: int | None = None  # alpha-QE neighbours at search time (0: off; None: as before, else off)
    dba: int | None = None  # alpha-DBA neighbours at index time (0: off; None: as before, else off)
    preset: str | None = None  # fast / balanced / best: fills the encoder and expansion not given explicitly
    on_disk: bool | None = None  # IVF-PQ served from disk (None: as before, or auto by memory_budget)
    memory_budget: int | None = None  # bytes the vectors may take in RAM before auto goes on disk (None: half the RAM)
    engine: str = "local"  # local (this machine's processes) or ray (a Ray cluster: indexer/distributed.py)
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else a local cluster started for the run
    tags: str | None = None  # a CSV of path,tag: tags given to pictures (paths relative to the folder)
    local_features: bool = True  # keep each picture's local features: fast verified copies (cbir/local_features.py)
    progress: bool = False
    model_kwargs: dict[str, Any] | None = None  # a family's model arguments (timm:, clip:), recorded in the index

    def resolved(self) -> BuildOptions:
        """A checked copy with the preset's settings filled in where none was given: what a build runs with."""
        if self.mode not in MODES:
            raise CbirError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CbirError("--batch-size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise CbirError("--workers must be 0 or more")
        for name in ("qe", "dba"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 50:
                raise CbirError(f"--{name} is a number of neighbours from 0 (off) to 50, not {value}")
        if self.engine not in ENGINES:
            raise CbirError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.on_disk and self.index_type not in (None, "auto", "ivfpq"):
            raise CbirError(f"--on-disk builds an IVF-PQ index; it cannot be combined with --index-type "
                            f"{self.index_type}")
        preset = preset_settings(self.preset) if self.preset is not None else {}
        return replace(self, exclude=tuple(self.exclude),
                       **{key: value for key, value in preset.items() if getattr(self, key) is None})
