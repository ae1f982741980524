"""When to merge segments: a tiered policy, as Lucene's. Segments are grouped in tiers by size (each tier ten times
the one below, from FLOOR rows); a tier holding PER_TIER segments is merged into one, and a segment of which more
than half is deleted is rewritten. Merging runs at the end of a write, bounded: at most BUDGET_ROWS rows are rewritten
per write (a merge never embeds an image; `cbir compact` merges everything at once).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cbir.search.manifest import Manifest, SegmentEntry

log = logging.getLogger(__name__)

FLOOR = 1_000  # segments up to this many live rows are one tier
FACTOR = 10
PER_TIER = 8  # this many segments in a tier: merge them
DELETED_SHARE = 0.5  # a segment with more deleted rows than this share is rewritten
BUDGET_ROWS = 2_000_000  # rows a write may rewrite in merges


def tier(entry: SegmentEntry) -> int:
    return int(math.log(max(entry.live, FLOOR) / FLOOR, FACTOR) + 1e-9)


def merges(segments: Iterable[SegmentEntry], budget: int = BUDGET_ROWS) -> list[list[str]]:
    """The merges to do now, smallest first, within the budget of rows rewritten."""
    by_tier: dict[int, list[SegmentEntry]] = {}
    for s in segments:
        by_tier.setdefault(tier(s), []).append(s)
    planned: list[list[SegmentEntry]] = []
    for t in sorted(by_tier):
        group = by_tier[t]
        if len(group) >= PER_TIER:
            planned.append(group)
        else:
            planned += [[s] for s in group if s.rows and s.deleted / s.rows > DELETED_SHARE]
    out, spent = [], 0
    for group in planned:
        cost = sum(s.live for s in group)
        if spent + cost > budget:
            break
        out.append([s.name for s in group])
        spent += cost
    return out


def merge_small(folder: Path, manifest: Manifest, *, mapper: Callable[..., Iterable[int]] = map,
                budget: int = BUDGET_ROWS) -> Manifest:
    """Run the merges the policy asks for now (each committed on its own: a kill loses at most the one running)."""
    from cbir.search.writer import merge_segments

    for names in merges(manifest.segments, budget):
        started = time.perf_counter()
        manifest = merge_segments(folder, manifest, names, mapper=mapper)
        log.info(f"merged {len(names)} segments in {time.perf_counter() - started:.1f} s")
    return manifest
