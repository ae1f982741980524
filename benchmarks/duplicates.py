"""`cbir duplicates` against hard negatives: copies must be grouped with their source, look-alikes never.

    python benchmarks/duplicates.py --data ../shared/data/animals4 --work /tmp/cbir-dups [--sources 100]

A seeded sample of the collection's photos is written with its 12 edited copies
(`cbir.edits.EDITS`: resize, JPEG 20, mirror, brightness/contrast, crop 70%, greyscale, rotation 15, canvas,
text banner, 96-px thumbnail, crop + JPEG, rotation + greyscale) into one folder per source. Beside them go the
hard negatives: for each source its 3 nearest *different* photos of the same class at cosine >= 0.7 (in animals4:
another ginger cat, another squirrel on grass). Sources and negatives are only photos that have no copy in the
data set itself: none at cosine >= 0.85, and none that `cbir duplicates` groups in the original collection (web
photo sets hold the same viral photo several times; by eye, those groups in animals4 are copies: crops, mirror
images, recoloured versions). Everything is indexed with the default encoder, and
`cbir duplicates` (find_duplicates) runs on it.

Pairs: two pictures "grouped" when they are in one reported group. Precision: grouped pairs from one source /
all grouped pairs (a look-alike grouped with a source, or two sources grouped, is an error). Recall: copies in the
same group as their source / all copies, per kind and overall. Time: find_duplicates alone, and with indexing.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from cbir import Index
from cbir.duplicates import find_duplicates
from cbir.edits import EDITS
from cbir.images import load_image


def make_collection(data: Path, work: Path, n: int, seed: int) -> Path:
    ref = Index.open(work / "reference") if (work / "reference" / "vectors.h5").exists() else \
        Index.build(data, out=work / "reference", device="cpu", precision="fp32")
    v, paths = ref.rows().vectors, ref.rows().paths
    assert v is not None
    sims = v @ v.T
    np.fill_diagonal(sims, -1)
    label = np.array([p.split("/")[0] for p in paths])
    in_data = {m["id"] for key in ("identical", "near") for g in find_duplicates(ref)[key] for m in g}
    has_copy = np.array([int(i) in in_data for i in ref.rows().ids]) | (sims.max(axis=1) >= 0.85)
    alone = np.flatnonzero(~has_copy)
    picks = np.random.default_rng(seed).choice(alone, size=min(n, len(alone)), replace=False)
    coll = work / "collection"
    shutil.rmtree(coll, ignore_errors=True)
    negatives: set[int] = set()
    for g, row in enumerate(sorted(picks)):
        folder = coll / f"g{g:04d}"
        folder.mkdir(parents=True)
        im = load_image(data / paths[row])
        im.save(folder / "source.jpg", quality=92)
        for k, edit in enumerate(EDITS.values()):
            edit(im).save(folder / f"copy{k:02d}.jpg", quality=92)
        same = np.flatnonzero((label == label[row]) & (sims[row] >= 0.7))
        negatives.update(int(j) for j in same[np.argsort(-sims[row, same])][:3] if j not in picks and not has_copy[j])
    (coll / "negatives").mkdir()
    for j in sorted(negatives):
        shutil.copy(data / paths[j], coll / "negatives" / f"n{j:05d}.jpg")
    return coll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--sources", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    coll = make_collection(Path(args.data), work, args.sources, args.seed)
    started = time.perf_counter()
    index = Index.build(coll, out=work / "index", device="cpu", rebuild=True)
    indexed = time.perf_counter() - started
    found = find_duplicates(index)
    took = time.perf_counter() - started - indexed
    group_of = {m["path"]: n for n, g in enumerate(found["near"]) for m in g}
    grouped = [(a["path"], b["path"]) for g in found["near"] for a, b in itertools.combinations(g, 2)]
    correct = sum(a.split("/")[0] == b.split("/")[0] and not a.startswith("negatives/") for a, b in grouped)
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for folder in sorted(p for p in coll.iterdir() if p.name.startswith("g")):
        src = f"{folder.name}/source.jpg"
        for k, name in enumerate(EDITS):
            copy = f"{folder.name}/copy{k:02d}.jpg"
            per_kind[name].append(src in group_of and group_of.get(copy) == group_of[src])
    recall = np.mean([x for v in per_kind.values() for x in v])
    print(f"{len(index)} pictures: {len(per_kind['mirror'])} sources x 12 copies + "
          f"{sum(1 for _ in (coll / 'negatives').iterdir())} hard negatives; {found['candidates']} candidate pairs, "
          f"{found['verified_pairs']} verified")
    print("| grouped pairs | precision | recall (copy with its source) | duplicates s | indexing s |")
    print("|---|---|---|---|---|")
    print(f"| {len(grouped)} | {correct / max(1, len(grouped)):.4f} | {recall:.4f} | {took:.1f} | {indexed:.1f} |")
    print("\n| edit | recall |\n|---|---|")
    for name, hits in per_kind.items():
        print(f"| {name} | {np.mean(hits):.3f} |")


if __name__ == "__main__":
    main()
