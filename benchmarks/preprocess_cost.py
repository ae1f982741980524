"""What one image costs the indexer before the model sees it, stage by stage, on one core.

    python benchmarks/preprocess_cost.py --images /tmp/cbir-throughput/640x480 [--encoder efficientnet_lite0]

Stages are those of a decoding worker (indexer.decode.decode): read the file and hash it, decode the
JPEG (draft mode, EXIF, RGB), read its metadata (EXIF date, camera, GPS, XMP keywords, a sidecar looked for), then
resize the centre-crop box to the network's input (Preprocess.pixels).
Milliseconds per image, medians of --repeats passes over the images. With the model's own cost per image
(2 cores / its images/s), this bounds what any overlap of decoding with inference can reach:
pipeline / model-only <= model core-ms / (model core-ms + preprocessing core-ms).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path
from statistics import median

import torch

from cbir import metadata
from cbir.encoders import create
from cbir.files import sha256_bytes
from cbir.images import decode_image, load_image
from indexer.decode import decode
from indexer.source import Source


def per_image_ms(fn, items: list, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for it in items:
            fn(it)
        runs.append((time.perf_counter() - t) / len(items) * 1000)
    return median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, help="a folder of JPEGs (index_throughput.py makes them)")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a worker's view: one core
    folder = Path(args.images)
    files = sorted(p.name for p in folder.glob("*.jpg"))[: args.limit]
    enc = create(args.encoder, weights="none" if args.encoder != "efficientnet_lite0" else None, device="cpu")
    pre = enc.preprocess
    source = Source.of(folder)
    data = [source.read(f)[0] for f in files]
    decoded = [load_image(io.BytesIO(d), draft=pre.draft_size) for d in data]
    pictures = [(f, decode_image(io.BytesIO(d), draft=pre.draft_size)) for f, d in zip(files, data, strict=True)]
    rows = [
        ("read + sha256", per_image_ms(lambda f: sha256_bytes(source.read(f)[0]), files, args.repeats)),
        ("decode (draft, EXIF, RGB)", per_image_ms(lambda d: load_image(io.BytesIO(d), draft=pre.draft_size),
                                                   data, args.repeats)),
        ("metadata (EXIF, XMP, sidecar looked for)", per_image_ms(
            lambda fp: metadata.read(fp[1].exif, fp[1].xmp, fp[1].size, 0, source.sidecar(fp[0])), pictures,
            args.repeats)),
        (f"resize crop box to {pre.size} ({pre.interpolation})", per_image_ms(pre.pixels, decoded, args.repeats)),
        ("whole worker item", per_image_ms(lambda f: decode(source, f, pre), files, args.repeats)),
    ]
    w, h = decoded[0].size
    print(f"{len(files)} images of {folder} (first decodes to {w}x{h}), encoder {args.encoder}, 1 core, "
          f"{os.cpu_count()} on the machine")
    print("| stage | ms per image |")
    print("|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
