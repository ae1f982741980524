"""Which local features should an index keep per picture for verified copies? Recall, bytes and time per query.

    python benchmarks/copy_features.py --data ../shared/data/animals4 IDX [--sources 42] [--held-out 100]
        [--variants 400x500,400x500!,400x300,400x200,400x128,300x300]

Each indexed picture's SIFT features are extracted the way the indexer does (from the picture as decoded for the
encoder, JPEG draft included) and held in memory, one table per variant (longer side, keypoints kept; descriptors
uint8, positions float16, as `cbir.local_features.pack` keeps them). The same seeded sample of indexed photos is
edited every way in `cbir.edits.EDITS`; each copy is embedded once, then put through
`cbir.copies.rank_copies_first` with every variant in turn (paired: the machine's noise falls on all alike), with
the kept features given through `Verification.features_of`. Reported per variant: bytes per picture, recall@1 with
verified copies first (the source or a byte-identical file of it), the ms of `rank_copies_first` without the
embedding (global search, the query's own features, matching; p50 / p95), and for photos the index does not hold
(`--held-out`): their ms and how many were wrongly given a verified copy.
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from copy_recall import SamePicture, content_of, held_out_photos  # benchmarks/ is on the path when run as a script

from cbir import Index
from cbir.copies import Verification, rank_copies_first
from cbir.edits import EDITS
from cbir.images import load_image
from cbir.local_features import Features, bytes_per_picture, extract, pack
from cbir.preprocess import Preprocess


@dataclass(kw_only=True)
class Variant:
    name: str
    side: int
    keep: int
    stop_early: bool = True
    hits: list[bool] = field(default_factory=list)
    extract_ms: list[float] = field(default_factory=list)  # CPU ms to extract one indexed picture's features
    ms: list[float] = field(default_factory=list)
    held_ms: list[float] = field(default_factory=list)
    false_copies: int = 0


def variants(spec: str) -> list[Variant]:
    """'400x500,400x200,...' (longer side x keypoints kept); a trailing '!' turns the early stop off."""
    out = []
    for part in spec.split(","):
        side, keep = part.rstrip("!").split("x")
        stop = not part.endswith("!")
        out.append(Variant(name=f"SIFT {side} px, {keep} kept{'' if stop else ', no early stop'}", side=int(side),
                           keep=int(keep), stop_early=stop))
    return out


class Tables:
    """Each indexed picture's features per (side, keypoints), extracted as the indexer does (from the picture as
    decoded for the encoder) once, packed as an index keeps them (uint8, float16)."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.draft = Preprocess.from_dict(index.encoder_config["preprocess"]).draft_size
        self.tables: dict[tuple[int, int], dict[int, Features]] = {}

    def features_of(self, variant: Variant):
        def get(ids: list[int]) -> list[Features | None]:
            table = self.tables.setdefault((variant.side, variant.keep), {})
            for i in ids:
                if i not in table:
                    im = load_image(io.BytesIO(self.index.file_of(i).read_bytes()), draft=self.draft)
                    started = time.process_time()
                    table[i] = extract(im, variant.keep, variant.side)
                    variant.extract_ms.append((time.process_time() - started) * 1000)
            kept = pack([table[i] for i in ids])
            return [kept.get(n) for n in range(len(ids))]

        return get


def _timed(index: Index, query, vector: np.ndarray, how: Verification) -> tuple[list, float]:
    assert how.features_of is not None
    how.features_of([r.id for r in index.search_vector(vector, k=how.candidates)])  # tables filled, not timed
    started = time.perf_counter()
    ranked = rank_copies_first(index, query, k=10, vector=vector, how=how)
    return ranked, (time.perf_counter() - started) * 1000


def run(index: Index, data: Path, picks: np.ndarray, held_out: list[str], chosen: list[Variant]) -> None:
    tables = Tables(index)
    hows = [Verification(features_of=tables.features_of(v), stop_early=v.stop_early, kept_side=v.side) for v in chosen]
    paths, hashes = content_of(index)
    same = SamePicture(index, hashes)
    for n, i in enumerate(picks, 1):
        im = load_image(data / paths[i])
        queries = [edit(im) for edit in EDITS.values()]
        for query, vector in zip(queries, index.encoder.embed(queries), strict=True):
            for v, how in zip(chosen, hows, strict=True):
                ranked, ms = _timed(index, query, vector, how)
                v.hits.append(same(ranked[0][0].path, paths[i]))
                v.ms.append(ms)
        print(f"{n}/{len(picks)} sources", flush=True)
    for rel in held_out:
        query = load_image(data / rel)
        vector = index.encoder.embed([query])[0]
        for v, how in zip(chosen, hows, strict=True):
            ranked, ms = _timed(index, query, vector, how)
            v.held_ms.append(ms)
            v.false_copies += any(e.verified for _, e in ranked)


def report(picks: int, held_out: int, chosen: list[Variant]) -> None:
    print(f"\n{picks} sources x {len(EDITS)} edits; {held_out} held-out photos; ms exclude the query's embedding")
    print("| kept per picture | bytes per picture | extraction CPU ms per picture (median) | recall@1 verified first "
          "| ms p50 | ms p95 | held-out ms p50 / p95 | held-out marked as copies |")
    print("|---|---|---|---|---|---|---|---|")
    for v in chosen:
        held = f"{np.percentile(v.held_ms, 50):.0f} / {np.percentile(v.held_ms, 95):.0f}" if v.held_ms else "-"
        cost = f"{np.median(v.extract_ms):.1f}" if v.extract_ms else "(shared)"
        print(f"| {v.name} | {bytes_per_picture(v.keep):,} | {cost} | {np.mean(v.hits):.4f} | "
              f"{np.percentile(v.ms, 50):.1f} | {np.percentile(v.ms, 95):.1f} | {held} | {v.false_copies} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index")
    ap.add_argument("--data", required=True, help="the folder the index was built from")
    ap.add_argument("--sources", type=int, default=42)
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="400x500,400x500!,400x300,400x200,400x128,300x300",
                    help="longer side x keypoints kept, comma-separated; '!' after one: no early stop")
    args = ap.parse_args()
    chosen = variants(args.variants)
    index = Index.open(args.index, device="cpu")
    picks = np.random.default_rng(args.seed).choice(len(index), min(args.sources, len(index)), replace=False)
    held = held_out_photos(index, Path(args.data), args.held_out, args.seed)
    run(index, Path(args.data), picks, held, chosen)
    report(len(picks), len(held), chosen)


if __name__ == "__main__":
    main()
