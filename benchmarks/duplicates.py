"""Near-duplicate threshold: precision and recall of `cbir duplicates` on generated copies of real photos.

    python benchmarks/duplicates.py --data ../shared/data/animals4 --work /tmp/cbir-dups

Every 8th photo of the collection is an original; each gets four copies: resized to 70%, re-encoded as
JPEG quality 40, cropped by 10% (5% off each side), and mirrored. All are indexed with the default encoder.
A pair is a true duplicate pair when both come from the same original. For each threshold the table gives
pair precision and recall, and the recall per kind of copy (original-copy pairs).
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cbir import Index
from cbir.duplicates import similar_pairs
from cbir.images import discover, load_image

KINDS = ("resize70", "jpeg40", "crop10", "mirror")


def make_copies(im: Image.Image) -> dict[str, Image.Image]:
    w, h = im.size
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=40)
    return {
        "resize70": im.resize((max(1, int(w * 0.7)), max(1, int(h * 0.7))), Image.BICUBIC),
        "jpeg40": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
        "crop10": im.crop((int(w * 0.05), int(h * 0.05), w - int(w * 0.05), h - int(h * 0.05))),
        "mirror": ImageOps.mirror(im),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--every", type=int, default=8)
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    coll = work / "collection"
    if not coll.exists():
        for n, rel in enumerate(discover(data).files[:: args.every]):
            im = load_image(data / rel)
            folder = coll / f"g{n:04d}"
            folder.mkdir(parents=True)
            im.save(folder / "original.jpg", quality=92)
            for kind, copy in make_copies(im).items():
                copy.save(folder / f"{kind}.jpg", quality=92)
    out = work / "index"
    index = Index.open(out) if (out / "vectors.h5").exists() else Index.build(coll, out=out, progress=True)
    s = index.store
    group = np.array([p.split("/")[0] for p in s.paths])
    kind = [p.split("/")[1].removesuffix(".jpg") for p in s.paths]
    true_pairs = {(i, j) for i, j in itertools.combinations(range(len(s.paths)), 2) if group[i] == group[j]}
    all_pairs = similar_pairs(s.vectors, 0.5)
    print(f"{len(set(group))} originals, {len(s.paths)} images, {len(true_pairs)} true pairs", file=sys.stderr)
    print("| threshold | pairs found | precision | recall | " + " | ".join(f"recall {k}" for k in KINDS) + " |")
    print("|---|---|---|---|" + "---|" * len(KINDS))
    for t in np.arange(0.70, 0.981, 0.02):
        found = {(i, j) for i, j, sc in all_pairs if sc >= t}
        tp = len(found & true_pairs)
        precision = tp / len(found) if found else 1.0
        recall = tp / len(true_pairs)
        per_kind = []
        for k in KINDS:
            want = {(i, j) for i, j in true_pairs if {kind[i], kind[j]} == {"original", k}}
            per_kind.append(len(want & found) / len(want))
        print(f"| {t:.2f} | {len(found)} | {precision:.4f} | {recall:.4f} | "
              + " | ".join(f"{r:.3f}" for r in per_kind) + " |")


if __name__ == "__main__":
    main()
