"""Why decoding workers run at nice 19, and how many there should be: the model with a busy decoder beside it,
then the whole pipeline with 1 or 2 workers at normal and low priority, in one run.

    python benchmarks/decode_priority.py --images /tmp/cbir-throughput/640x480

(`benchmarks/index_throughput.py` makes that folder: 600 JPEGs at 640x480.) On few cores the model's threads
move in lockstep, so a decoder that pre-empts one of them stalls all of them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import indexer.decode as decode_stage
from cbir.encoders import create
from cbir.encoders._device import configure_threads
from cbir.images import discover, load_image
from indexer import BuildOptions, build

SPAWN = multiprocessing.get_context("spawn")  # a forked child of a process running torch threads can hang


def _busy_decoder(folder: str, name: str, nice: int, stop, counter) -> None:
    os.nice(nice)
    torch.set_num_threads(1)
    pre = create(name, weights="none" if name in ("resnet50", "vgg16") else None, device="cpu").preprocess
    files = discover(folder).files
    n = 0
    while not stop.is_set():
        pre.pixels(load_image(Path(folder) / files[n % len(files)], draft=pre.draft_size))
        n += 1
        counter.value = n


def model_rate(enc, batch: int, seconds: float = 6.0) -> float:
    x = torch.randn(batch, 3, enc.preprocess.size, enc.preprocess.size)
    enc.embed_tensor(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        enc.embed_tensor(x)
        n += batch
    return n / (time.perf_counter() - t)


def with_decoder(enc, name: str, folder: str, nice: int, batch: int) -> tuple[float, float]:
    stop, counter = SPAWN.Event(), SPAWN.Value("l", 0)
    proc = SPAWN.Process(target=_busy_decoder, args=(folder, name, nice, stop, counter))
    proc.start()
    while counter.value == 0:
        time.sleep(0.1)
    start_n, t = counter.value, time.perf_counter()
    rate = model_rate(enc, batch)
    decoded = (counter.value - start_n) / (time.perf_counter() - t)
    stop.set()
    proc.join()
    return rate, decoded


def pipeline_rate(enc, folder: str, work: Path, workers: int, nice: int, batch: int) -> float:
    decode_stage.DECODE_NICE = nice
    options = BuildOptions(batch_size=batch, workers=workers, mode="rebuild")
    summary = build(Path(folder), work / f"idx-w{workers}-n{nice}", options, encoder=enc)
    return summary.images_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, help="a folder of photos (640x480 JPEGs)")
    ap.add_argument("--work", default="/tmp/cbir-decode-priority")
    ap.add_argument("--encoders", default="efficientnet_lite0,resnet50")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    configure_threads()
    work = Path(args.work)
    cores = os.cpu_count()
    print(f"{cores} cores, torch {torch.__version__}, {args.precision}, batch {args.batch}, medians of "
          f"{args.repeats}", file=sys.stderr)
    print(f"\nA. model-only images/s with a busy decoding process beside it ({cores} cores)")
    print("| encoder | model alone | + decoder nice 0 | (decoder img/s) | + decoder nice 19 | (decoder img/s) |")
    print("|---|---|---|---|---|---|")
    rows_b = []
    for name in args.encoders.split(","):
        enc = create(name, weights="none" if name in ("resnet50", "vgg16") else None, device="cpu",
                     precision=args.precision)
        alone, n0, d0, n19, d19 = ([] for _ in range(5))
        for _ in range(args.repeats):
            alone.append(model_rate(enc, args.batch))
            r, d = with_decoder(enc, name, args.images, 0, args.batch)
            n0.append(r), d0.append(d)
            r, d = with_decoder(enc, name, args.images, 19, args.batch)
            n19.append(r), d19.append(d)
        med = statistics.median
        print(f"| {name} | {med(alone):.1f} | {med(n0):.1f} | {med(d0):.0f} | {med(n19):.1f} | {med(d19):.0f} |",
              flush=True)
        configs = ((1, 0), (1, 19), (2, 0), (2, 19))
        rates: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
        model: list[float] = []
        for _ in range(args.repeats):
            model.append(model_rate(enc, args.batch))
            for workers, nice in configs:
                rates[(workers, nice)].append(pipeline_rate(enc, args.images, work, workers, nice, args.batch))
        rows_b.append((name, statistics.median(model), {c: statistics.median(v) for c, v in rates.items()}))
    decode_stage.DECODE_NICE = 19
    print("\nB. whole `cbir index` pipeline, images/s (and / model-only measured in the same loop)")
    print("| encoder | model-only | 1 worker nice 0 | 1 worker nice 19 | 2 workers nice 0 | 2 workers nice 19 |")
    print("|---|---|---|---|---|---|")
    for name, model, rates in rows_b:
        cells = " | ".join(f"{rates[c]:.1f} ({rates[c] / model:.2f})" for c in ((1, 0), (1, 19), (2, 0), (2, 19)))
        print(f"| {name} | {model:.1f} | {cells} |")


if __name__ == "__main__":
    main()
