"""What an indexing run did, in numbers and in words."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cbir.images import Skipped, describe_left_out

if TYPE_CHECKING:
    from cbir.encoders import Encoder


@dataclass(kw_only=True)
class Summary:
    out: Path
    encoder: Encoder
    mode: str = "create"
    indexed: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    embedded: int = 0
    resumed: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    left_out: dict[tuple[str, str], int] = field(default_factory=dict)  # files that are not pictures, counted
    renamed: int = 0  # new paths whose bytes were indexed already (renamed, moved): their vectors were kept
    segments: int = 1
    retagged: int = 0  # unchanged pictures whose tags --tags changed

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        text = (f"indexed {self.indexed} images, skipped {len(self.skipped)}, in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s) -> {self.out}")
        if self.mode == "update":
            text += (f"\nupdate: {self.added} added, {self.changed} changed, {self.removed} removed, "
                     f"{self.unchanged} unchanged, {self.renamed} renamed (vectors kept); {self.segments} segments")
            text += f"; {self.retagged} re-tagged" if self.retagged else ""
        if self.resumed:
            text += (f"\nresumed: {self.resumed} images were already embedded by an interrupted run; "
                     f"{self.embedded} embedded now")
        if self.left_out:
            text += "\nleft out: " + ", ".join(describe_left_out(self.left_out))
        if self.skipped:
            shown = "\n".join(f"  skipped {s.path}: {s.reason}" for s in self.skipped[:20])
            more = f"\n  ... and {len(self.skipped) - 20} more (see cbir info)" if len(self.skipped) > 20 else ""
            text += "\n" + shown + more
        return text
