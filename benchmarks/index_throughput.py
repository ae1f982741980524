"""Indexing throughput: model alone vs the whole `cbir index` pipeline vs a naive loop, per encoder, in one run.

    python benchmarks/index_throughput.py --data ../shared/data/animals4 --work /tmp/cbir-throughput

Inputs are generated once from real photos: 640 x 480 JPEGs and 12-megapixel (4000 x 3000) JPEGs. For each
encoder the table gives, on the same machine in the same run:
  model-only   images/s of the network alone on ready tensors (batch 1/8/16/32; fp32 and bf16; median of 3
               timings of 96 images each)
  naive        one image at a time: PIL open (no draft), preprocess, fp32 eager forward of the network as
               built (batch norms not folded); median of --repeats runs over --naive images
  kept BN      model-only in bf16 at batch 16 with the batch norms not folded into the convolutions, to
               show what folding (done by cbir.encoders.create) is worth
  cbir index   the whole pipeline (discover, decode in workers, embed, write HDF5 + FAISS): first with the
               default settings, twice: at first use (precision auto measures, and that is inside the time;
               'chosen' is what it picked) and again (the measurement is reused from the cache, as on every
               later run on this machine); then in the chosen precision at batch 8/16/32 on 640x480, and at
               the default batch on 12 MP. Each is the median of --repeats runs (3): the machines are shared.
and the two ratios the issue sets targets for: pipeline / model-only at the same batch and precision
(>= 0.9), and default pipeline / naive (>= 2.5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from PIL import Image

from cbir.encoders import create
from cbir.images import discover
from indexer import BuildOptions, build


def make_inputs(data: Path, work: Path, n_small: int, n_large: int) -> tuple[Path, Path]:
    small, large = work / "640x480", work / "12mp"
    files = discover(data).files
    step = max(1, len(files) // max(n_small, n_large))
    picks = files[::step]
    for folder, n, size in ((small, n_small, (640, 480)), (large, n_large, (4000, 3000))):
        if folder.exists() and len(list(folder.glob("*.jpg"))) == n:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, rel in enumerate(picks[:n]):
            with Image.open(data / rel) as im:
                im.convert("RGB").resize(size, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return small, large


def model_rate(enc, batch: int, repeats: int = 3, images: int = 96) -> float:
    """Median over `repeats` timings of at least `images` images each (a single batch call is too short to
    time on a shared machine)."""
    size = enc.preprocess.size
    x = torch.randn(batch, 3, size, size)
    enc.embed_tensor(x)
    calls = max(1, images // batch)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            enc.embed_tensor(x)
        rates.append(calls * batch / (time.perf_counter() - t))
    return median(rates)


def naive_rate(enc, folder: Path, n: int) -> float:
    """The loop simple demos run: one file decoded in full, resized whole then cropped, normalised in numpy,
    one fp32 forward in NCHW."""
    files = sorted(folder.glob("*.jpg"))[:n]
    pre = enc.preprocess
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    model = enc.model.to(memory_format=torch.contiguous_format)
    t = time.perf_counter()
    with torch.no_grad():
        for f in files:
            im = Image.open(f).convert("RGB")
            w, h = im.size
            scale = pre.draft_size / min(w, h)
            nw, nh = max(pre.size, round(w * scale)), max(pre.size, round(h * scale))
            left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
            im = im.resize((nw, nh), Image.BILINEAR).crop((left, top, left + pre.size, top + pre.size))
            x = (np.asarray(im, np.float32) / 255 - mean) / std
            model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None])
    rate = len(files) / (time.perf_counter() - t)
    model.to(memory_format=torch.channels_last)
    return rate


BATCHES = (1, 8, 16, 32)


def pipeline_rate(name: str, weights: str | None, folder: Path, out: Path, precision: str,
                  batch: int | None = None) -> tuple[float, str]:
    enc = create(name, weights=weights, device="cpu", precision=precision)
    summary = build(folder, out, BuildOptions(mode="rebuild", batch_size=batch), encoder=enc)
    return summary.images_per_s, enc.precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--encoders", default="efficientnet_lite0,resnet50:none,vgg16:none,colour_histogram",
                    help="name[:weights] list; siamese:FILE and autoencoder:FILE for trained models")
    ap.add_argument("--small", type=int, default=600, help="640x480 images")
    ap.add_argument("--large", type=int, default=48, help="12 MP images")
    ap.add_argument("--naive", type=int, default=32, help="images for the naive loop")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each cbir index measurement (median shown)")
    args = ap.parse_args()
    work = Path(args.work)
    os.environ["CBIR_CACHE"] = str(work / "cache")  # a fresh cache: the first default run is a first use
    shutil.rmtree(work / "cache", ignore_errors=True)
    small, large = make_inputs(Path(args.data), work, args.small, args.large)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {args.small} images 640x480, {args.large} 12 MP",
          file=sys.stderr)
    rows = []
    for spec in args.encoders.split(","):
        name, _, weights = spec.partition(":")
        weights = weights or None
        enc = create(name, weights=weights, device="cpu")
        model = {}
        for p in ("fp32", "bf16"):
            enc.precision = p
            model[p] = {b: model_rate(enc, b) for b in BATCHES}
        del enc
        plain = create(name, weights=weights, device="cpu", fold_batchnorm=False)
        naive = median(naive_rate(plain, small, args.naive) for _ in range(args.repeats))
        plain.precision = "bf16"
        kept_bn = model_rate(plain, 16)
        del plain
        auto_runs, again_runs, choices = [], [], []
        for _ in range(args.repeats):  # first use: an empty cache each time, so precision auto measures
            shutil.rmtree(work / "cache", ignore_errors=True)
            rate, picked = pipeline_rate(name, weights, small, work / f"idx-{name}-small", "auto")
            auto_runs.append(rate)
            choices.append(picked)
            again_runs.append(pipeline_rate(name, weights, small, work / f"idx-{name}-small", "auto")[0])
        e2e_auto, e2e_again = median(auto_runs), median(again_runs)
        chosen = max(set(choices), key=choices.count)
        if choices.count(chosen) < len(choices):
            print(f"{name}: precision auto chose {choices} in {len(choices)} first uses", file=sys.stderr)
        by_batch = {b: median(pipeline_rate(name, weights, small, work / f"idx-{name}-b{b}", chosen, b)[0]
                              for _ in range(args.repeats)) for b in (8, 16, 32)}
        e2e_large = median(pipeline_rate(name, weights, large, work / f"idx-{name}-large", chosen)[0]
                           for _ in range(args.repeats))
        row = (name, model, kept_bn, naive, chosen, e2e_auto, e2e_again, by_batch, e2e_large)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    print("\nimages/s on this machine (model-only and pipeline per batch: 1 / 8 / 16 / 32; pipeline: 8 / 16 / 32)")
    print("| encoder | model fp32 | model bf16 | bf16 b16, kept BN | naive loop "
          "| default cbir index, first use / again (640x480) | auto chose | cbir index in chosen precision, 640x480 "
          "| same, 12 MP | pipeline / model, best batch "
          "| default / naive, first use / again |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, model, kept_bn, naive, chosen, auto_rate, again_rate, by_batch, large_rate in rows:
        fmt = {p: " / ".join(f"{model[p][b]:.1f}" for b in BATCHES) for p in model}
        best = max(by_batch, key=by_batch.get)
        ref = model.get(chosen, model["fp32"])[best]
        print(f"| {name} | {fmt['fp32']} | {fmt['bf16']} | {kept_bn:.1f} | {naive:.1f} "
              f"| {auto_rate:.1f} / {again_rate:.1f} "
              f"| {chosen} | {' / '.join(f'{by_batch[b]:.1f}' for b in (8, 16, 32))} | {large_rate:.1f} "
              f"| {by_batch[best] / ref:.2f} (b{best}) | {auto_rate / naive:.2f} / {again_rate / naive:.2f} |")


if __name__ == "__main__":
    main()
