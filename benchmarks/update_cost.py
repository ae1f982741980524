"""What `cbir index --update` costs: a 10,000-image index with 100 changed files, against embedding 100 images.

    python benchmarks/update_cost.py --data ../shared/data/animals4 --work /tmp/cbir-update

A 10,000-image collection (symlinked copies of --data) is indexed with the default settings; then 100 of
its files are replaced by re-encoded, resized copies, and the index (a fresh copy each repeat) is updated;
the same 100 files are also indexed on their own as a new index. Both run in this process, through the same
pipeline, with the index's own encoder (and precision). Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import make_collection  # noqa: E402

from cbir.encoders import from_config
from cbir.search.store import read
from indexer import BuildOptions, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--changed", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    images, alone, src = work / "images", work / "changed-alone", work / "index"
    make_collection(Path(args.data), images, args.images)
    t = time.perf_counter()
    build(images, src, BuildOptions(device="cpu", precision="auto"))
    full = time.perf_counter() - t
    store = read(src / "vectors.h5", vectors=False)
    step = max(1, len(store.paths) // args.changed)
    changed = store.paths[::step][: args.changed]
    for rel in changed:
        p = images / rel
        im = Image.open(p).convert("RGB")
        buf = io.BytesIO()
        im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(buf, "JPEG", quality=80)
        p.unlink()
        p.write_bytes(buf.getvalue())
        (alone / rel).parent.mkdir(parents=True, exist_ok=True)
        (alone / rel).write_bytes(buf.getvalue())
    update_s, alone_s, summary = [], [], None
    for r in range(args.repeats):
        idx = work / f"index-{r}"
        shutil.copytree(src, idx)
        enc = from_config(store.encoder_config, device="cpu")
        summary = build(images, idx, BuildOptions(mode="update"), encoder=enc)
        update_s.append(summary.seconds)
        enc = from_config(store.encoder_config, device="cpu")
        alone_s.append(build(alone, work / f"alone-{r}", BuildOptions(mode="rebuild"), encoder=enc).seconds)
        shutil.rmtree(idx)
    assert summary is not None
    u, a = statistics.median(update_s), statistics.median(alone_s)
    print(f"{len(store.paths)} images indexed with {store.encoder_config['name']} "
          f"({store.encoder_config.get('precision', 'fp32')}); {os.cpu_count()} cores; medians of {args.repeats}")
    print(f"update summary: {summary.added} added, {summary.changed} changed, {summary.removed} removed, "
          f"{summary.unchanged} unchanged")
    print("| run | seconds (median) | all runs |")
    print("|---|---|---|")
    print(f"| --update, {args.changed} of {len(store.paths)} changed | {u:.2f} | "
          f"{', '.join(f'{x:.2f}' for x in update_s)} |")
    print(f"| the {args.changed} changed files indexed alone | {a:.2f} | {', '.join(f'{x:.2f}' for x in alone_s)} |")
    print(f"| ratio update / alone | {u / a:.2f} | |")
    print(f"| (the first full index of {len(store.paths)} images) | {full:.1f} | |")


if __name__ == "__main__":
    main()
