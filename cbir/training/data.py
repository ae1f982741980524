"""Training data: labels (folders, CSV or none), the seeded stratified split, and cached views.

Training on a 2-core CPU must finish in minutes, so every image is decoded and augmented a fixed number
of times (view 0 is the plain index-time preprocessing, the others random crops/flips/colour jitter),
passed once through the frozen part of the network, and the result is cached in float16. Epochs then
only run the trainable part.
"""

from __future__ import annotations

import csv
import hashlib
import random
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import nn

from cbir.encoders.base import Preprocess
from cbir.errors import CbirError, ImageError
from cbir.images import discover, load_image


@dataclass(kw_only=True)
class Collection:
    root: Path
    files: list[str]
    labels: list[str] | None  # None: train without labels

    @property
    def fingerprint(self) -> str:
        """Identifies the training set: file list and labels (not contents, which would need a full read)."""
        h = hashlib.sha256()
        for i, f in enumerate(self.files):
            h.update(f.encode())
            if self.labels:
                h.update(self.labels[i].encode())
        return h.hexdigest()


def load_collection(root: str | Path, labels: str = "auto") -> Collection:
    """labels: 'folders' (class = first folder), 'none', a CSV path (file,label), or 'auto'."""
    root = Path(root)
    try:
        found = discover(root)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise CbirError(str(exc)) from exc
    files = found.files
    if not files:
        raise CbirError(f"no images found under {root}")
    if labels == "auto":
        labels = "folders" if all("/" in f for f in files) and len({f.split("/")[0] for f in files}) > 1 else "none"
    if labels == "none":
        return Collection(root=root, files=files, labels=None)
    if labels == "folders":
        if not all("/" in f for f in files):
            raise CbirError("--labels folders needs every image inside a class sub-folder of DIR")
        names = [f.split("/")[0] for f in files]
        if len(set(names)) < 2:
            raise CbirError("--labels folders found only one class; use --labels none")
        return Collection(root=root, files=files, labels=names)
    path = Path(labels)
    if not path.is_file():
        raise CbirError(f"--labels must be folders, none, or a CSV file; {labels!r} is none of these")
    table: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if len(row) < 2 or row[0].strip().lower() == "file":
                continue
            table[row[0].strip()] = row[1].strip()
    kept = [f for f in files if f in table]
    if len(kept) < 2 or len({table[f] for f in kept}) < 2:
        raise CbirError(f"{path}: fewer than two labelled images or classes match files under {root}")
    return Collection(root=root, files=kept, labels=[table[f] for f in kept])


def stratified_split(coll: Collection, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                     seed: int = 0) -> list[str]:
    """'train' / 'val' / 'test' per file, the same proportions within each class, reproducible by seed."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i in range(len(coll.files)):
        groups[coll.labels[i] if coll.labels else ""].append(i)
    rng = random.Random(seed)
    split = [""] * len(coll.files)
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        n = len(idx)
        n_train = max(1, round(n * fractions[0]))
        n_val = max(1 if n - n_train > 1 else 0, round(n * fractions[1]))
        for j, i in enumerate(idx):
            split[i] = "train" if j < n_train else "val" if j < n_train + n_val else "test"
    return split


def write_split(path: Path, coll: Collection, split: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "split"])
        for i, f in enumerate(coll.files):
            w.writerow([f, coll.labels[i] if coll.labels else "", split[i]])


def augment(im: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Random resized crop (40-100% of the area), horizontal flip, brightness/contrast/colour jitter."""
    w, h = im.size
    for _ in range(10):
        area = rng.uniform(0.4, 1.0) * w * h
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            im = im.crop((x, y, x + cw, y + ch))
            break
    im = im.resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))


def _normalise(im: Image.Image, pre: Preprocess) -> np.ndarray:
    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return arr.transpose(2, 0, 1)


@torch.inference_mode()
def cache_views(coll: Collection, pre: Preprocess, trunk: nn.Module, *, views: int, seed: int,
                device: torch.device, batch_size: int = 32, progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """[N, views, ...] float16 trunk outputs, and a mask of images that decoded (others are dropped)."""
    from tqdm import tqdm

    rng = random.Random(seed)
    trunk.eval().to(device)
    out: torch.Tensor | None = None
    ok = np.ones(len(coll.files), bool)
    pending: list[np.ndarray] = []
    slots: list[tuple[int, int]] = []

    def flush() -> None:
        nonlocal out
        if not pending:
            return
        x = torch.from_numpy(np.stack(pending)).to(device)
        y = trunk(x).to(torch.float16).cpu()
        if out is None:
            out = torch.zeros((len(coll.files), views, *y.shape[1:]), dtype=torch.float16)
        for (i, v), t in zip(slots, y, strict=True):
            out[i, v] = t
        pending.clear()
        slots.clear()

    bar = tqdm(total=len(coll.files), unit="img", desc="caching views", disable=not progress, file=sys.stderr)
    for i, f in enumerate(coll.files):
        try:
            im = load_image(coll.root / f, draft=pre.draft_size * 2)
        except ImageError:
            ok[i] = False
            bar.update(1)
            continue
        pending.append(pre(im))
        slots.append((i, 0))
        for v in range(1, views):
            pending.append(_normalise(augment(im, pre.size, rng), pre))
            slots.append((i, v))
        if len(pending) >= batch_size:
            flush()
        bar.update(1)
    flush()
    bar.close()
    if out is None:
        raise CbirError("none of the training images could be decoded")
    return out, ok
